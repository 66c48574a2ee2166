"""Faults with two hosts serving: the state database stopped and started under load (both hosts serve on with the
state they applied, say so in /readyz and `endpoint show`, refuse changes with 503, and take changes again once it is
back), and a host killed mid-load and mid-job (the other serves on, takes changes, and runs the dead host's job to its
end; restarted, the killed host serves the current state)."""

from __future__ import annotations

import contextlib
import json
import signal
from collections import Counter

import httpx
import pytest
from sqlalchemy import select

from serving.control.database import explain_jobs
from support.operations import Admin, deployment, predict, spread_load, state_column
from support.postgres import Postgres, wait_until
from support.servers import Server, png_bytes

JOB_IMAGES = 12  # XRAI at 32 px: about half a second each, so a job is mid-way for several seconds


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


def job_worker(server: Server, job_id: str) -> str | None:
    """The worker (HOST/PID) the state database names as running the job."""
    return state_column(server, select(explain_jobs.c.worker).where(explain_jobs.c.id == job_id))[0]


def job_running_on(server: Server, key: str) -> tuple[str, str]:
    """A batch job submitted through `server`, which that host's worker claims at once (the other host's looks each
    second: if it was first, the job is cancelled and sent again), once some of its images are done; with the worker
    running it."""
    headers = {"Authorization": f"Bearer {key}"}
    files = [("images", (f"{i}.png", png_bytes(shape=("circle", "square", "x")[i % 3]), "image/png"))
             for i in range(JOB_IMAGES)]
    for _ in range(3):
        accepted = httpx.post(f"{server.url}/explain/jobs", params={"method": "xrai"}, files=files, headers=headers,
                              timeout=60)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]

        def started() -> bool:
            job = httpx.get(f"{server.url}/explain/jobs/{job_id}", headers=headers, timeout=30).json()
            return job["state"] != "queued" and job["progress"]["images_done"] >= 2

        assert wait_until(started, seconds=60, every=0.1)
        worker = job_worker(server, job_id) or ""
        if worker.startswith(server.env["LANTERN_HOST_ID"] + "/"):
            return job_id, worker
        httpx.delete(f"{server.url}/explain/jobs/{job_id}", headers=headers, timeout=30)
    raise AssertionError("the other host claimed each job first")


def test_a_host_killed_mid_load_and_mid_job_and_restarted(hosts: list[Server], keys: dict[str, str],
                                                          admins: list[Admin]) -> None:
    a, b = admins
    killed = hosts[1]
    headers = {"Authorization": f"Bearer {keys['primary']}"}
    job_id, dead_worker = job_running_on(killed, keys["primary"])
    with spread_load(hosts[:1], keys["primary"]) as statuses:
        kill_host(killed)
        cut_short = httpx.get(f"{hosts[0].url}/explain/jobs/{job_id}", headers=headers, timeout=30).json()
        assert cut_short["state"] == "running" and 2 <= cut_short["progress"]["images_done"] < JOB_IMAGES
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

    # the dead host's job: taken back once its worker was silent, run to its end; the images done before stay done
    def polled() -> dict:
        return httpx.get(f"{hosts[0].url}/explain/jobs/{job_id}", headers=headers, timeout=30).json()

    assert wait_until(lambda: polled()["state"] not in ("queued", "running"), seconds=120, every=0.5)
    job = polled()
    assert (job["state"], job["attempts"]) == ("succeeded", 2), job
    assert job["progress"]["labels_done"] == job["progress"]["labels_total"] == JOB_IMAGES  # none explained twice
    assert job_worker(hosts[0], job_id) != dead_worker
    rows = httpx.get(f"{hosts[1].url}/explain/jobs/{job_id}/result", timeout=60,
                     headers={**headers, "Accept": "application/x-ndjson"}).text.splitlines()
    assert [len(json.loads(row)["explanations"]) for row in rows] == [1] * JOB_IMAGES
