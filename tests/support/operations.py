"""The two-worker endpoint the control-plane tests share (tests/e2e/rollout/): its deployments, its keys, the
management API as an admin uses it, and the CLI."""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from support.common import lantern_executable
from support.servers import Server, png_bytes

FAST = {"request_timeout_ms": 30000, "max_concurrent_requests_per_instance": 16, "max_queue_wait_ms": 10000}

# ready at the first probe; each probe runs the model, so probing twice a second cost a server of six detectors a
# third of a CPU core while idle
PROBE = {"initial_delay": 0, "period": 5}


def deployment(name: str, model: str = "models:/mc/1", **fields) -> dict:
    return {"name": name, "model": model, "request_settings": FAST, "readiness_probe": PROBE, **fields}


def credential(server: Server, kind: str) -> str:
    out = subprocess.run([lantern_executable(), "endpoint", "get-credentials", "ops", "--key", kind],
                         capture_output=True, text=True, check=True, env=server.env)
    return out.stdout.strip()


class Admin:
    """The management API with the admin key; each change waits until every worker applied it."""

    def __init__(self, server: Server, key: str) -> None:
        self.server = server
        self.http = httpx.Client(base_url=f"{server.url}/manage", headers={"Authorization": f"Bearer {key}"},
                                 timeout=60)

    def endpoint(self) -> dict:
        response = self.http.get("/endpoint")
        assert response.status_code == 200, response.text
        return response.json()

    def applied(self, answer: httpx.Response) -> dict:
        assert answer.status_code in (200, 202), f"{answer.text}\n{self.server.log()}"
        revision = self.endpoint()["revision"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            view = self.endpoint()
            if view["applied"] and view["revision"] >= revision:
                return view
            time.sleep(0.05)
        raise AssertionError(f"revision {revision} not applied by every worker: {self.endpoint()['workers']}")

    def ready(self, name: str, generation: int | None = None) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            view = self.http.get(f"/deployments/{name}").json()
            assert view["state"] != "failed", view
            if view["state"] == "ready" and (generation is None or view["generation"] == generation):
                return view
            time.sleep(0.1)
        raise AssertionError(f"deployment {name} not ready: {view}")

    def add(self, config: dict) -> dict:
        self.applied(self.http.post("/deployments", json=config))
        return self.ready(config["name"])

    def traffic(self, **split: int) -> dict:
        return self.applied(self.http.put("/traffic", json=split))

    def mirror(self, **split: int) -> dict:
        return self.applied(self.http.put("/mirror-traffic", json=split))

    def remove(self, name: str) -> dict:
        return self.applied(self.http.delete(f"/deployments/{name}"))

    def reset(self) -> None:
        """Back to blue=100 with no other deployment and no mirror."""
        view = self.endpoint()
        if view["mirror_traffic"]:
            self.mirror()
        if view["traffic"].get("blue") != 100:
            self.traffic(blue=100)
        for d in view["deployments"]:
            if d["name"] != "blue":
                self.remove(d["name"])


def predict(server: Server, key: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", content=png_bytes(), timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png", **headers})


@contextmanager
def spread_load(servers: list[Server], key: str, clients: int = 3) -> Iterator[Counter]:
    """Predictions sent to `servers` in turn (as a load balancer spreads them) by `clients` threads for the block; the
    statuses they got."""
    statuses: Counter = Counter()
    stop = threading.Event()

    def send(offset: int) -> None:
        for server in itertools.islice(itertools.cycle(servers), offset, None):
            if stop.is_set():
                return
            statuses[predict(server, key).status_code] += 1

    senders = [threading.Thread(target=send, args=(n,)) for n in range(clients)]
    for sender in senders:
        sender.start()
    try:
        yield statuses
    finally:
        stop.set()
        for sender in senders:
            sender.join(60)


def cli(server: Server, admin_key: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**server.env, "LANTERN_URL": server.url, "LANTERN_ADMIN_KEY": admin_key}
    result = subprocess.run([lantern_executable(), *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def drains_then_stops(server: Server, key: str) -> None:
    """SIGTERM to `lantern serve` alone, as an orchestrator sends it, with `--drain-seconds`: every worker is unready at
    once but answers on, each answer closing its connection (so clients reconnect through the load balancer); then the
    server stops."""
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 4
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.05)
    time.sleep(0.2)  # the arbiter signals the workers one after the other
    answers = [predict(server, key) for _ in range(4)]
    assert [(answer.status_code, answer.headers.get("connection")) for answer in answers] == [(200, "close")] * 4
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
    server.process.wait(timeout=60)
    with pytest.raises(httpx.ConnectError):
        predict(server, key)
    log = server.log()
    assert log.count("SIGTERM: draining for 5 s") == 2, log  # one line per worker


def yaml_config(server: Server) -> dict:
    import yaml

    return yaml.safe_load(server.config_path.read_text())


def state_column(server: Server, statement) -> list:  # noqa: ANN001 - a SQLAlchemy select of one column
    """What `statement` reads from the server's state database (for what no client can see: which worker runs a job,
    where its results are kept)."""
    from sqlalchemy import create_engine

    engine = create_engine(server.env["LANTERN_STATE_URI"])
    try:
        with engine.connect() as connection:
            return list(connection.execute(statement).scalars())
    finally:
        engine.dispose()
