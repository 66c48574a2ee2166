"""The operator's commands against the running endpoint: changes that wait until they take effect, key
regeneration, and `lantern rollout` (moving traffic, rolling back, losing no request)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter

import httpx
import pytest
import torch

from support.operations import Admin, cli, credential, deployment, predict
from support.servers import Server, png_bytes


def test_cli_changes_wait_until_they_take_effect(server: Server, keys: dict[str, str], admin: Admin) -> None:
    added = cli(server, keys["admin"], "deploy", "add", "green", "models:/mc/2", "--set", "valid_crop_size=28",
                "--set", "readiness_probe.period=0.5", "--set", "readiness_probe.initial_delay=0")
    assert "green is ready in every worker: models:/mc/2" in added.stderr
    cli(server, keys["admin"], "traffic", "mirror", "green=20")
    assert admin.endpoint()["mirror_traffic"] == {"green": 20}
    cli(server, keys["admin"], "traffic", "mirror", "--off")
    cli(server, keys["admin"], "traffic", "set", "blue=90", "green=10")
    view = admin.endpoint()
    assert view["traffic"] == {"blue": 90, "green": 10} and view["applied"]
    shown = cli(server, keys["admin"], "endpoint", "show")
    assert "green" in shown.stdout and "10 %" in shown.stdout and "ready" in shown.stdout
    words = " ".join(shown.stdout.split())  # rich wraps long lines
    assert "onnxruntime" in words and words.count(" MiB)") == 2, shown.stdout  # each worker's memory
    assert ("GiB in use by every process on it" in words) == torch.cuda.is_available(), shown.stdout  # the GPU's
    as_json = json.loads(cli(server, keys["admin"], "endpoint", "show", "--json").stdout)
    assert as_json["traffic"] == {"blue": 90, "green": 10}
    assert all(100 * 2**20 < worker["memory_bytes"] < 20 * 2**30 for worker in as_json["workers"]), as_json["workers"]
    refused = cli(server, keys["admin"], "deploy", "remove", "green", check=False)
    assert refused.returncode == 2 and "live traffic" in refused.stderr
    updated = cli(server, keys["admin"], "deploy", "update", "green", "--model", "models:/mc/1")
    assert "serves generation 2 in every worker: models:/mc/1" in updated.stderr
    again = cli(server, keys["admin"], "deploy", "update", "green", "--model", "models:/mc/1")
    assert "green unchanged: generation 2 already serves models:/mc/1" in " ".join(again.stderr.split())
    assert "updated" not in again.stderr and admin.http.get("/deployments/green").json()["generation"] == 2
    cli(server, keys["admin"], "traffic", "set", "blue=100")
    cli(server, keys["admin"], "deploy", "remove", "green")
    assert [d["name"] for d in admin.endpoint()["deployments"]] == ["blue"]
    wrong = cli(server, keys["primary"], "endpoint", "show", check=False)
    assert wrong.returncode == 2 and "403" in wrong.stderr


def test_regenerated_key_replaces_the_old_one_in_every_worker(server: Server, keys: dict[str, str],
                                                              admin: Admin) -> None:
    old = keys["secondary"]
    new = cli(server, keys["admin"], "keys", "regenerate", "secondary").stdout.strip()
    assert new and new != old and credential(server, "secondary") == new
    assert all(predict(server, old).status_code == 401 for _ in range(10))
    assert all(predict(server, new).status_code == 200 for _ in range(10))
    keys["secondary"] = new


def test_rollout_command_moves_traffic_and_rolls_back(server: Server, keys: dict[str, str], admin: Admin) -> None:
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(f"{server.url}/predict", content=png_bytes(),
                            headers={"Authorization": f"Bearer {keys['primary']}", "Content-Type": "image/png"})

    clients = [threading.Thread(target=load) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        done = cli(server, keys["admin"], "rollout", "green", "models:/mc/2", "--steps", "50,100", "--interval", "2s",
                   "--min-requests", "5", "--max-p99-ms", "60000", "--set", "readiness_probe.initial_delay=0")
        assert "rollout of green done: blue=0, green=100" in done.stderr
        assert admin.endpoint()["traffic"] == {"blue": 0, "green": 100}
        failed = cli(server, keys["admin"], "rollout", "teal", "models:/mc/1", "--steps", "10,100", "--interval",
                     "20s", "--min-requests", "5", "--max-p99-ms", "1", "--set", "readiness_probe.initial_delay=0",
                     check=False)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failed.returncode == 1 and "Rolled back" in failed.stderr and "p99 latency" in failed.stderr
    view = admin.endpoint()
    assert view["traffic"] == {"blue": 0, "green": 100, "teal": 0}
    admin.traffic(blue=100)


def test_live_rollout_loses_no_request(server: Server, keys: dict[str, str], admin: Admin) -> None:
    """20 clients send requests while blue=100 -> 90/10 -> 50/50 -> 0/100 and blue is removed and re-added, twice;
    no request fails and the observed split matches the configured one."""
    admin.add(deployment("green"))
    stop = threading.Event()
    results: list[tuple[float, float, int, str]] = []  # sent, answered, status, deployment
    lock = threading.Lock()
    image = base64.b64encode(png_bytes()).decode()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post(f"{server.url}/score", headers={"Authorization": f"Bearer {keys['primary']}"},
                                       json={"input_data": {"columns": ["image"], "data": [image]}})
                    outcome = (answer.status_code, answer.headers.get("x-lantern-deployment", ""))
                except httpx.HTTPError as error:
                    outcome = (0, type(error).__name__)
                with lock:
                    results.append((sent, time.monotonic(), *outcome))

    phases: list[tuple[float, float, int]] = []  # start, end, green percent
    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    try:
        for _cycle in range(2):
            for green in (0, 10, 50, 100):
                admin.traffic(blue=100 - green, green=green)
                start = time.monotonic()
                time.sleep(1.0)
                phases.append((start, time.monotonic(), green))
            admin.remove("blue")
            admin.add(deployment("blue"))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    statuses = Counter(status for _, _, status, _ in results)
    print(f"live rollout: {len(results)} requests, statuses {dict(statuses)}")
    failed = [r for r in results if r[2] != 200]
    if failed:  # the server's log without its access lines: a worker that died says why there
        log = server.log_path.read_text(errors="replace").splitlines()
        pytest.fail(f"{len(failed)} requests failed, e.g. {failed[:5]}; server log:\n"
                    + "\n".join([line for line in log if "(scheme=http" not in line][-60:]))
    for green in (0, 10, 50, 100):
        served = Counter(d for start, end, g in phases if g == green
                         for sent, answered, _, d in results if start <= sent and answered <= end)
        total = served["blue"] + served["green"]
        share = served["green"] / total
        tolerance = 4 * (green / 100 * (1 - green / 100) / total) ** 0.5
        print(f"  blue={100 - green} green={green}: {total} requests, green share {share:.3f} (+-{tolerance:.3f})")
        assert total >= 100 and set(served) <= {"blue", "green"}
        assert abs(share - green / 100) <= tolerance
