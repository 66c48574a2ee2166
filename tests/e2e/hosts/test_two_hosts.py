"""One endpoint served by two hosts from one PostgreSQL state: a change made through either host's management API
is applied by both, each host's counters are in the sum either answers with, changes made at once through both are
all kept, a rollout under load spread over both fails no request, a key regenerated through one host works on the
other at once (the old one stops), and an explanation job submitted through one host is answered by both."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import select

from serving.control.database import explain_job_outputs
from support.operations import FAST, Admin, cli, deployment, predict, spread_load, state_column
from support.postgres import wait_until
from support.servers import Server, png_bytes


def served_by(server: Server, key: str, count: int) -> Counter:
    """Which deployment answered each of `count` predictions on `server`."""
    answers = [predict(server, key) for _ in range(count)]
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]
    return Counter(answer.headers["x-lantern-deployment"] for answer in answers)


def requests_counted(admin: Admin) -> int:
    """Requests answered by blue and green, as one host's management API counts them."""
    return sum(d["counters"]["requests"] for d in admin.http.get("/deployments").json())


def test_a_change_through_one_host_is_applied_by_both(hosts: list[Server], keys: dict[str, str],
                                                      admins: list[Admin]) -> None:
    a, b = admins
    a.add(deployment("green", model="models:/mc/2"))  # waits for every worker of both hosts to serve it
    # B's view has A's workers as they published last (every second): the same within a second
    green = b.ready("green")
    seen_from_b = b.endpoint()
    assert {worker["host"] for worker in seen_from_b["workers"]} == {"host-a", "host-b"}
    assert seen_from_b["applied"] and seen_from_b["revision"] == a.endpoint()["revision"]
    assert green["ready_everywhere"] and green["model_version"] == "models:/mc/2"
    assert {worker.split("/")[0] for worker in green["workers"]} == {"host-a", "host-b"}
    for server in hosts:  # each host downloaded the version through the MLflow server into its own cache
        assert list((Path(server.env["LANTERN_HOME"]) / "models").rglob("mc/2/artifacts/weights.safetensors"))

    a.traffic(blue=50, green=50)
    counted_by_a = requests_counted(a)
    assert set(served_by(hosts[1], keys["primary"], 30)) == {"blue", "green"}
    # host B's requests are in the counters host A answers with, once B's workers published them (every second)
    assert wait_until(lambda: requests_counted(a) >= counted_by_a + 30, seconds=5), (counted_by_a, requests_counted(a))
    assert wait_until(lambda: requests_counted(b) == requests_counted(a), seconds=5)
    b.traffic(blue=0, green=100)
    assert served_by(hosts[0], keys["primary"], 10) == {"green": 10}
    assert a.endpoint()["last_change"] == "traffic set to blue=0, green=100"


def test_changes_made_at_once_through_both_hosts_are_all_kept(admins: list[Admin]) -> None:
    a, b = admins
    a.add(deployment("patchy"))
    for round_ in range(3):
        patches = [(a, {"settings": {"valid_crop_size": 28 + round_}}),
                   (b, {"request_settings": {**FAST, "max_queue_wait_ms": 9000 - round_}})]
        barrier = threading.Barrier(len(patches))
        answers: list[httpx.Response] = []

        def send(admin: Admin, patch: dict) -> None:
            with httpx.Client(base_url=admin.http.base_url, headers=admin.http.headers, timeout=60) as http:
                barrier.wait()
                answers.append(http.patch("/deployments/patchy", json=patch))

        threads = [threading.Thread(target=send, args=patch) for patch in patches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answer.status_code for answer in answers) == [202, 202], [answer.text for answer in answers]
        for admin in (a, b):
            config = admin.http.get("/deployments/patchy").json()["config"]
            assert config["settings"] == {"valid_crop_size": 28 + round_}
            assert config["request_settings"]["max_queue_wait_ms"] == 9000 - round_


def test_a_rollout_under_load_over_both_hosts_fails_no_request(hosts: list[Server], keys: dict[str, str],
                                                               admins: list[Admin]) -> None:
    """Load spread over both hosts (as a load balancer spreads it) while green is added and the traffic moves to it
    in steps through alternate hosts, then back: every request is answered 200."""
    a, b = admins
    with spread_load(hosts, keys["primary"], clients=4) as statuses:
        a.add(deployment("green", model="models:/mc/2"))
        b.ready("green")  # B judges readiness by A's workers' statuses as published (each second)
        for step, (admin, green) in enumerate(zip(itertools.cycle((b, a)), (10, 50, 100, 0))):
            admin.traffic(blue=100 - green, green=green)
            time.sleep(0.5 + step * 0.1)
    assert sum(statuses.values()) > 20 and set(statuses) == {200}, statuses


def test_lantern_rollout_through_one_host_judges_the_requests_of_both(hosts: list[Server], keys: dict[str, str],
                                                                     admins: list[Admin]) -> None:
    """`lantern rollout` talks to host A while every request goes to host B: its gates see B's requests (the counters
    are summed over the hosts), so a canary too slow for them is rolled back, and a good one is rolled out with no
    failed request (with only A's own counters there would be nothing to judge, and both would pass)."""
    settings = ["--set", "readiness_probe.initial_delay=0", "--set",  # as the tests' own deployments: 4 clients fit
                f"request_settings.max_concurrent_requests_per_instance={FAST['max_concurrent_requests_per_instance']}",
                "--set", f"request_settings.max_queue_wait_ms={FAST['max_queue_wait_ms']}"]
    with spread_load(hosts[1:], keys["primary"], clients=4) as statuses:
        slow = cli(hosts[0], keys["admin"], "rollout", "teal", "models:/mc/1", "--steps", "50,100", "--interval", "6s",
                   "--min-requests", "5", "--max-p99-ms", "1", *settings, check=False)
        good = cli(hosts[0], keys["admin"], "rollout", "green", "models:/mc/2", "--steps", "50,100", "--interval",
                   "2s", "--min-requests", "5", "--max-p99-ms", "60000", *settings)
    assert slow.returncode == 1 and "Rolled back" in slow.stderr and "p99 latency" in slow.stderr, slow.stderr
    assert "rollout of green done: blue=0, green=100" in good.stderr
    assert admins[1].endpoint()["traffic"] == {"blue": 0, "green": 100, "teal": 0}
    assert sum(statuses.values()) > 20 and set(statuses) == {200}, statuses


def test_a_key_regenerated_through_one_host_works_on_the_other(hosts: list[Server], keys: dict[str, str],
                                                               admins: list[Admin]) -> None:
    old = keys["primary"]
    answer = admins[1].http.post("/keys/primary/regenerate")
    assert answer.status_code == 200, answer.text
    new = answer.json()["key"]
    assert wait_until(lambda: predict(hosts[0], new).status_code == 200, seconds=1.5)  # within a second of the change
    assert predict(hosts[0], old).status_code == 401 and predict(hosts[1], old).status_code == 401
    assert predict(hosts[1], new).status_code == 200
    keys["primary"] = new


def test_a_job_submitted_through_one_host_is_polled_and_fetched_through_the_other(hosts: list[Server],
                                                                                  keys: dict[str, str]) -> None:
    """Jobs live in the shared database: whichever host's worker runs it, both answer for it."""
    headers = {"Authorization": f"Bearer {keys['primary']}"}
    files = [("images", (f"{i}.png", png_bytes(shape=shape), "image/png")) for i, shape in enumerate(("circle", "x"))]
    accepted = httpx.post(f"{hosts[0].url}/explain/jobs", params={"method": "guided_backprop"}, files=files,
                          headers=headers, timeout=60)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    seen: set[str] = set()

    def finished() -> bool:
        job = httpx.get(f"{hosts[1].url}/explain/jobs/{job_id}", headers=headers, timeout=30).json()
        seen.add(job["state"])
        return job["state"] == "succeeded"

    assert wait_until(finished, seconds=120, every=0.25), seen
    for host in hosts:
        rows = httpx.get(f"{host.url}/explain/jobs/{job_id}/result", timeout=60,
                         headers={**headers, "Accept": "application/x-ndjson"}).text.splitlines()
        assert [json.loads(row)["name"] for row in rows] == ["0.png", "1.png"]
        assert all(json.loads(row)["explanations"] for row in rows)
    # kept as files in the MLflow server's artifact store (the hosts' limit), the database naming them
    assert state_column(hosts[0], select(explain_job_outputs.c.location).where(
        explain_job_outputs.c.job == job_id).order_by(explain_job_outputs.c.position)) == [f"{job_id}/0", f"{job_id}/1"]
