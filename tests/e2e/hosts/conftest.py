"""Two Lantern hosts (separate `lantern serve` processes, Lantern homes and ports) serving one endpoint from one
state database on a real PostgreSQL server, with the registry behind a real `mlflow server` (PostgreSQL backend,
proxied artifacts), as replicas behind a load balancer do. The hosts share no file: only the two servers; each is
given the same keys, as a Secret gives every replica."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import LABELS, SMALL_SETTINGS, own_store
from support.mlflow_server import mlflow_server
from support.operations import Admin, deployment
from support.postgres import Postgres, wait_until
from support.servers import Server

KEY_VARIABLES = ("LANTERN_API_KEY", "LANTERN_API_KEY_SECONDARY", "LANTERN_ADMIN_KEY")


@pytest.fixture(scope="package")
def registered(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path],
               postgres: Postgres) -> Iterator[str]:
    """The registry both hosts serve from (an MLflow server's URL), with versions 1 and 2 of `mc` registered through
    it from a Lantern home of their own."""
    from registry.register import register_checkpoint

    folder = tmp_path_factory.mktemp("hosts-registry")
    with mlflow_server(postgres.database("registry"), folder) as url, own_store(folder):
        for _ in range(2):
            register_checkpoint("mc", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                                tracking_uri=url)
        yield url


@pytest.fixture(scope="package")
def hosts(registered: str, postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Host A, launched first (it makes the state and its keys file before its workers start), then host B with a
    copy of A's keys, both loading at once."""
    state = postgres.database("hosts")
    # every job result kept as files, in the MLflow server's proxied artifact store (the hosts share no disk)
    config = {"name": "ops", "deployments": [deployment("blue")], "traffic": {"blue": 100},
              "limits": {"job_inline_result_bytes": 0}}
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            folder = tmp_path_factory.mktemp(f"host-{name}")
            env = {**base, "LANTERN_HOME": str(folder / "home"), "LANTERN_STATE_URI": state,
                   "MLFLOW_TRACKING_URI": registered, "LANTERN_HOST_ID": f"host-{name}"}
            if servers:
                keys = Path(servers[0].env["LANTERN_HOME"]) / "endpoints" / "ops" / "credentials.json"
                assert wait_until(keys.exists, seconds=60), servers[0].log()  # written once A's state is made
                (folder / "home" / "endpoints" / "ops").mkdir(parents=True)
                shutil.copy2(keys, folder / "home" / "endpoints" / "ops" / "credentials.json")
            servers.append(Server(config, folder, env, workers=1).launch())
        for server in servers:
            server.wait_until_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="package")
def keys(hosts: list[Server]) -> dict[str, str]:
    from support.operations import credential

    return {kind: credential(hosts[0], kind) for kind in ("primary", "secondary", "admin")}


@pytest.fixture()
def admins(hosts: list[Server], keys: dict[str, str]) -> Iterator[list[Admin]]:
    """The management API of each host; the endpoint is back to blue=100 alone after each test."""
    clients = [Admin(server, keys["admin"]) for server in hosts]
    clients[0].reset()
    yield clients
    clients[0].reset()
