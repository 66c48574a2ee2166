"""A throwaway PostgreSQL server for tests: `$LANTERN_TEST_POSTGRES_URL` when set, else a cluster made with the
machine's PostgreSQL binaries (`pg_config --bindir`) in a temporary folder, run as the `postgres` system user when the
tests run as root (the server refuses to run as root). Where neither is possible the tests skip saying why, except in
CI (`$CI` or `$LANTERN_REQUIRE_POSTGRES` set, as .ci/run does), where PostgreSQL is required and its absence fails
them."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

URL_ENV = "LANTERN_TEST_POSTGRES_URL"
REQUIRED_ENV = "LANTERN_REQUIRE_POSTGRES"  # set by .ci/run
SERVER_USER = "postgres"


@dataclass
class Postgres:
    """A running PostgreSQL server the tests may stop and start again (`url` reaches its `lantern` database)."""

    url: str
    folder: Path | None = None  # None: a server given by $LANTERN_TEST_POSTGRES_URL (not ours to stop)
    bindir: Path | None = None
    port: int = 0
    run_as: list[str] | None = None

    def _ctl(self, *arguments: str) -> None:
        assert self.folder is not None and self.bindir is not None, "a server given by URL cannot be stopped here"
        subprocess.run([*(self.run_as or []), str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-w",
                        "-t", "60", *arguments], check=True, capture_output=True, timeout=90)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def start(self) -> None:
        self._ctl("start", "-l", str(self.folder / "server.log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c max_connections=200")

    def database(self, prefix: str) -> str:
        """A new, empty database on this server (named `prefix` and a unique suffix: a server given by URL may hold
        earlier runs' databases); its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{time.monotonic_ns()}"
        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") or os.environ.get(REQUIRED_ENV):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"no PostgreSQL: {reason} (set {URL_ENV}, or install Debian's postgresql)")


def _bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    found = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
    return found if (found / "initdb").exists() and (found / "pg_ctl").exists() else None


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL server for the duration of the block."""
    given = os.environ.get(URL_ENV)
    if given:
        yield Postgres(url=given)
        return
    bindir = _bindir()
    if bindir is None:
        _unavailable("pg_config or its initdb and pg_ctl are not on this machine")
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            _unavailable(f"running as root and there is no {SERVER_USER!r} user to run the server as")
        run_as = ["runuser", "-u", SERVER_USER, "--"]
    folder = Path(tempfile.mkdtemp(prefix="lantern-postgres-"))
    if run_as:
        os.chown(folder, account.pw_uid, account.pw_gid)
    server = Postgres(url="", folder=folder, bindir=bindir, port=_free_port(), run_as=run_as)
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "lantern",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
        server.start()
        subprocess.run([*run_as, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U",
                        "lantern", "lantern"], check=True, capture_output=True, timeout=60)
        server.url = f"postgresql+psycopg://lantern@127.0.0.1:{server.port}/lantern"
        yield server
    finally:
        try:
            server.stop()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(folder, ignore_errors=True)


def wait_until(check, seconds: float = 10.0, every: float = 0.05) -> bool:  # noqa: ANN001
    """Whether `check()` became true within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return bool(check())
