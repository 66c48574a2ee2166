"""Faults with two hosts serving: the state database stopped and started under load (both hosts serve on with the
state they applied, say so in /readyz and `endpoint show`, refuse changes with 503, and take changes again once it is
back), and a host killed mid-load (the other serves on and takes changes; restarted, it serves the current state)."""

from __future__ import annotations

import contextlib
import signal
from collections import Counter

import httpx
import pytest

from support.operations import Admin, deployment, predict, spread_load
from support.postgres import Postgres, wait_until
from support.servers import Server


def kill_host(server: Server) -> None:
    """SIGKILL to the host's `lantern serve` and every process under it (its workers are in process groups of their
    own), as when the machine or the pod dies."""
    import psutil

    root = psutil.Process(server.process.pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    server.process.wait(30)


def database_reachable(server: Server) -> bool | None:
    answer = httpx.get(f"{server.url}/readyz", timeout=10)
    return answer.json()["state_database"]["reachable"] if answer.status_code == 200 else None


def test_serving_goes_on_while_the_state_database_is_down(hosts: list[Server], keys: dict[str, str],
                                                          admins: list[Admin], postgres: Postgres) -> None:
    if postgres.folder is None:
        pytest.skip("the PostgreSQL server was given by URL: not ours to stop")
    a, b = admins
    revision = a.endpoint()["revision"]
    with spread_load(hosts, keys["primary"]) as statuses:
        postgres.stop()
        try:
            for server in hosts:  # still ready: they serve with the state they applied, and say what is wrong
                assert wait_until(lambda server=server: database_reachable(server) is False, seconds=5)
            refused = b.http.put("/traffic", json={"blue": 100})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_unavailable", refused.text
            assert "does not answer" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "5"
            shown = a.endpoint()
            assert not shown["state_database"]["reachable"] and shown["revision"] == revision
            assert shown["state_database"]["serving_revision"] == revision
            assert [d["name"] for d in shown["deployments"]] == ["blue"]
        finally:
            postgres.start()
        for server in hosts:
            assert wait_until(lambda server=server: database_reachable(server) is True, seconds=15)
        changed = b.traffic(blue=100)  # changes are taken again, and applied by both hosts
        assert changed["revision"] == revision + 1 and a.endpoint()["applied"]
    assert sum(statuses.values()) > 10 and set(statuses) == {200}, statuses


def test_a_host_killed_mid_load_and_restarted(hosts: list[Server], keys: dict[str, str],
                                              admins: list[Admin]) -> None:
    a, b = admins
    killed = hosts[1]
    with spread_load(hosts[:1], keys["primary"]) as statuses:
        kill_host(killed)
        with pytest.raises(httpx.ConnectError):
            predict(killed, keys["primary"])
        # host A takes a change alone (the killed host's workers drop out of the view once silent)
        a.add(deployment("green", model="models:/mc/2"))
        a.traffic(blue=50, green=50)
        killed.start()  # restarted: it restores the current state from the database
        seen = b.endpoint()
        assert seen["revision"] == a.endpoint()["revision"] and seen["traffic"] == {"blue": 50, "green": 50}
        assert {w["host"] for w in seen["workers"]} == {"host-a", "host-b"}
        assert set(Counter(predict(killed, keys["primary"]).headers["x-lantern-deployment"]
                           for _ in range(20))) == {"blue", "green"}
    assert sum(statuses.values()) > 10 and set(statuses) == {200}, statuses
