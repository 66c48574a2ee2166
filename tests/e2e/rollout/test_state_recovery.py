"""The endpoint's state across faults and restarts: a damaged state, a restart that restores the state, and
draining on SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from support.operations import Admin, deployment, drains_then_stops, predict, yaml_config
from support.servers import Server, png_bytes


def test_a_damaged_state_is_logged_once_and_serving_goes_on(server: Server, keys: dict[str, str],
                                                            admin: Admin) -> None:
    """The state's row broken by hand (a newer revision whose document is not JSON): every worker keeps serving its
    last good state and logs the problem once (not at each of its 5 polls a second), a change is refused naming the
    problem, and the log says when it works again."""
    database = sqlite3.connect(Path(os.environ["LANTERN_HOME"]) / "state.db", timeout=30)
    (good, revision), = database.execute("SELECT document, revision FROM lantern_endpoint_state WHERE endpoint='ops'")
    logged = len(server.log_path.read_text(errors="replace"))

    def replace_with(document: str, at: int) -> None:
        with database:
            database.execute("UPDATE lantern_endpoint_state SET document=?, revision=? WHERE endpoint='ops'",
                             (document, at))

    replace_with("{damaged by hand", revision + 1)
    try:
        time.sleep(2)  # about 10 polls in each worker
        assert predict(server, keys["primary"]).status_code == 200
        refused = admin.http.put("/traffic", json={"blue": 100})
        assert refused.status_code == 422 and "damaged" in refused.json()["error"]["message"], refused.text
    finally:
        replace_with(good, revision)
        database.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = server.log_path.read_text(errors="replace")[logged:]
        if log.count("following the endpoint state works again") >= 2:
            break
        time.sleep(0.2)
    assert log.count("following the endpoint state failed") == 2, log[-3000:]  # once in each of the 2 workers
    assert log.count("following the endpoint state works again") == 2, log[-3000:]
    assert predict(server, keys["primary"]).status_code == 200


def test_restart_comes_back_with_the_same_state(server: Server, keys: dict[str, str]) -> None:
    """Last in this module: it stops the module's server, with a request in flight, which is answered in full before
    the server ends (SIGTERM lets in-flight requests finish, as an orchestrator's rolling restart expects; new
    connections are refused). The restarted server has the same state and a finished explanation job's result, and
    drains before it stops (`--drain-seconds`)."""
    admin = Admin(server, keys["admin"])
    admin.reset()
    admin.add(deployment("green"))
    admin.traffic(blue=70, green=30)
    before = admin.endpoint()
    auth = {"Authorization": f"Bearer {keys['primary']}"}
    job = httpx.post(f"{server.url}/explain/jobs", params={"method": "guided_backprop"}, content=png_bytes(),
                     headers={**auth, "Content-Type": "image/png"}, timeout=60).json()
    deadline = time.monotonic() + 60  # a finished explanation job: the restarted server still has its result
    while httpx.get(f"{server.url}/explain/jobs/{job['id']}", headers=auth).json()["state"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    result = httpx.get(f"{server.url}/explain/jobs/{job['id']}/result", headers=auth, timeout=60).json()
    row = json.dumps({"image_base64": base64.b64encode(png_bytes()).decode(), "model_explainability": True,
                      "xai_parameters": {"xai_algorithm": "xrai", "n_steps": 256}})
    answers: list[httpx.Response] = []
    in_flight = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{server.url}/score", json={"input_data": {"columns": ["image"], "data": [row] * 8}}, timeout=120,
        headers={"Authorization": f"Bearer {keys['primary']}"})))
    explained = server.metric("lantern_explanation_duration_seconds_count")
    in_flight.start()
    deadline = time.monotonic() + 60  # its first row explained: the request is under way, 7 rows to go
    while server.metric("lantern_explanation_duration_seconds_count") == explained and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()
    in_flight.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert [bool(answer["visualizations"]) for answer in answers[0].json()] == [True] * 8
    with pytest.raises(httpx.ConnectError):
        predict(server, keys["primary"])
    restarted = Server(yaml_config(server), server.folder, server.env, workers=2, options=("--drain-seconds", "5"))
    restarted.config_path = server.config_path
    restarted.start()
    try:
        again = Admin(restarted, keys["admin"])
        deadline = time.monotonic() + 120
        while not all(d["state"] == "ready" for d in again.endpoint()["deployments"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        after = again.endpoint()
        assert (after["revision"], after["traffic"], after["key_fingerprints"]) == (
            before["revision"], before["traffic"], before["key_fingerprints"])
        assert [(d["name"], d["generation"], d["state"]) for d in after["deployments"]] == [
            (d["name"], d["generation"], "ready") for d in before["deployments"]]
        assert predict(restarted, keys["primary"]).status_code == 200
        assert "restored" in restarted.log()
        kept = httpx.get(f"{restarted.url}/explain/jobs/{job['id']}/result", headers=auth, timeout=60)
        assert kept.status_code == 200 and kept.json() == result
        drains_then_stops(restarted, keys["primary"])
    finally:
        restarted.stop()
