"""Explanation jobs over HTTP on the shared scoring server: one image answered as `/explain` answers it, a batch with
a bad image in it (as a zip, JSON lines or one JSON document), a multi-label model pinned, live explanations taking
the pool back from a job, cancelling, the queue limit, and the refusals."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from explain.encoding import decode_npy_base64
from support.common import lantern_executable, lantern_here
from support.scoring import SLOW_IG, auth, wait_for_metric
from support.servers import Server, png_bytes

JOBS = "/explain/jobs"
IG = {"method": "integrated_gradients", "params": {"n_steps": 16}}
ENDED = ("succeeded", "failed", "cancelled")


def encoded(image: bytes) -> str:
    return base64.b64encode(image).decode()


def submit(server: Server, key: str, headers: dict | None = None, **request) -> httpx.Response:
    return httpx.post(f"{server.url}{JOBS}", headers=auth(key, **(headers or {})), timeout=60, **request)


def poll(server: Server, key: str, job_id: str) -> dict:
    answer = httpx.get(f"{server.url}{JOBS}/{job_id}", headers=auth(key), timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait(server: Server, key: str, job_id: str, states: tuple[str, ...] = ENDED, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while (job := poll(server, key, job_id))["state"] not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}: {job}"
        time.sleep(0.2)
    return job


def result(server: Server, key: str, job_id: str, accept: str | None = None) -> httpx.Response:
    headers = auth(key, **({"Accept": accept} if accept else {}))
    return httpx.get(f"{server.url}{JOBS}/{job_id}/result", headers=headers, timeout=60)


def test_one_image_through_a_job_answers_as_explain_does(server: Server, key: str) -> None:
    image = png_bytes()
    accepted = submit(server, key, json={"image_base64": encoded(image), **IG})
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert accepted.headers["location"] == f"{JOBS}/{job['id']}" == job["links"]["status"]
    assert accepted.headers["x-lantern-deployment"] == "blue" == job["deployment"]
    assert (job["state"] in ("queued", "running"), job["batch"], job["model_version"], job["method"]) == (
        True, False, "models:/mc/1", "integrated_gradients")
    assert job["progress"] == {"images_done": 0, "images_total": 1, "labels_done": 0, "fraction": 0.0}

    done = wait(server, key, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"] == {"images_done": 1, "images_total": 1, "labels_done": 1, "labels_total": 1,
                                "fraction": 1.0}
    assert done["attempts"] == 1 and "error" not in done
    assert done["created_at"] <= done["started_at"] <= done["finished_at"] < done["expires_at"]

    answer = result(server, key, job["id"])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.headers["x-lantern-model-version"] == "models:/mc/1"
    from_job = answer.json()
    live = httpx.post(f"{server.url}/explain", json={"image_base64": encoded(image), **IG}, headers=auth(key),
                      timeout=60).json()
    assert set(from_job) == set(live) and from_job["deployment"] == live["deployment"] == "blue"
    assert done["images"] == [{"index": 0, "name": "image 0", "state": "succeeded", "labels": 1,
                               "targets": [live["explanations"][0]["label"]]}]  # its prediction, as /explain's
    assert [e["label"] for e in from_job["explanations"]] == [e["label"] for e in live["explanations"]]
    ours, theirs = (decode_npy_base64(a["explanations"][0]["attributions"]) for a in (from_job, live))
    assert ours.shape == (3, 32, 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * float(np.abs(theirs).max()))
    assert from_job["fidelity"]["method"] == "integrated_gradients"
    assert from_job["fidelity"]["params"]["n_steps"] == 16

    png = result(server, key, job["id"], accept="image/png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-lantern-explained-label"] == live["explanations"][0]["label"]
    assert Image.open(io.BytesIO(png.content)).size[0] > 32


def test_a_batch_names_each_images_outcome_and_answers_a_zip_json_lines_or_json(server: Server, key: str) -> None:
    files = [("images", ("red-circle.png", png_bytes(), "image/png")),
             ("images", ("blue-square.png", png_bytes(shape="square", color=(40, 40, 220)), "image/png")),
             ("images", ("broken.png", b"these bytes are no image", "image/png"))]
    accepted = submit(server, key, files=files, params={"method": "guided_backprop"})
    assert accepted.status_code == 202, accepted.text
    job = wait(server, key, accepted.json()["id"])
    assert (job["state"], job["batch"], job["method"]) == ("succeeded", True, "guided_backprop")
    assert job["progress"] == {"images_done": 3, "images_total": 3, "labels_done": 2, "labels_total": 2,
                               "fraction": 1.0}
    assert [(i["name"], i["state"]) for i in job["images"]] == [
        ("red-circle.png", "succeeded"), ("blue-square.png", "succeeded"), ("broken.png", "failed")]
    assert job["images"][2]["error"]["code"] == "unsupported_media_type"

    archive = result(server, key, job["id"])  # a batch: a zip unless asked otherwise
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    assert f"explanations-{job['id']}.zip" in archive.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(archive.content)) as opened:
        document = json.loads(opened.read("result.json"))
        named = {path for row in document["results"] for e in row["explanations"]
                 for path in (e["visualization"], e["attributions"])}
        assert set(opened.namelist()) == {"result.json", *named} and len(named) == 4
        first = document["results"][0]["explanations"][0]
        assert Image.open(io.BytesIO(opened.read(first["visualization"]))).format == "PNG"
        attributions = np.load(io.BytesIO(opened.read(first["attributions"])), allow_pickle=False)
        assert attributions.shape == (3, 32, 32) and attributions.dtype == np.float32
    assert (document["job"], document["deployment"], document["method"]) == (job["id"], "blue", "guided_backprop")
    assert document["results"][2]["error"]["code"] == "unsupported_media_type"
    assert document["results"][2]["explanations"] == []

    lines = result(server, key, job["id"], accept="application/x-ndjson")
    assert lines.status_code == 200 and lines.headers["content-type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in lines.text.splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2] and rows[1]["name"] == "blue-square.png"
    assert base64.b64decode(rows[0]["explanations"][0]["visualization"])[:4] == b"\x89PNG"
    assert decode_npy_base64(rows[0]["explanations"][0]["attributions"]).shape == (3, 32, 32)

    whole = result(server, key, job["id"], accept="application/json")
    assert whole.headers["content-type"] == "application/json"
    assert [r["state"] for r in whole.json()["results"]] == ["succeeded", "succeeded", "failed"]


def test_a_pinned_multi_label_job_explains_each_predicted_label(server: Server, key: str) -> None:
    image = png_bytes()
    accepted = submit(server, key, headers={"x-lantern-deployment": "green"},
                      json={"images": [{"image_base64": encoded(image), "name": "one"}, encoded(image)],
                            "method": "guided_gradcam", "attributions": False})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["deployment"] == "green" and accepted.json()["model_version"] == "models:/ml/1"
    job = wait(server, key, accepted.json()["id"])
    live = httpx.post(f"{server.url}/explain", json={"image_base64": encoded(image), "method": "guided_gradcam"},
                      headers=auth(key, **{"x-lantern-deployment": "green"}), timeout=60).json()
    labels = [e["label"] for e in live["explanations"]]
    assert len(labels) >= 2, labels  # a multi-label prediction: an explanation per label
    assert job["progress"]["labels_done"] == job["progress"]["labels_total"] == 2 * len(labels)
    assert [(i["name"], i["targets"]) for i in job["images"]] == [("one", labels), ("image 1", labels)]
    rows = result(server, key, job["id"], accept="application/json").json()["results"]
    assert [[e["label"] for e in row["explanations"]] for row in rows] == [labels, labels]
    assert all("attributions" not in e for row in rows for e in row["explanations"])  # as asked


def test_live_explanations_take_the_pool_back_and_a_cancelled_job_stops(server: Server, key: str) -> None:
    """A job on `slow` (1024 integrated-gradients steps at 448 px: many seconds) holds the worker's one explanation
    slot; a live `/explain` takes it back (the job's run is abandoned, made again later), and cancelling the job
    stops its running explanation."""
    abandoned = server.metric("lantern_explanation_runs_total", deployment="slow", outcome="abandoned")
    accepted = submit(server, key, headers={"x-lantern-deployment": "slow"},
                      json={"image_base64": encoded(png_bytes()), **SLOW_IG})
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    wait(server, key, job_id, states=("running",))
    time.sleep(1.5)  # its explanation under way
    progress = poll(server, key, job_id)["progress"]  # its label chosen first: the total is known before the work
    assert (progress["labels_done"], progress["labels_total"], progress["fraction"]) == (0, 1, 0.0)

    live = httpx.post(f"{server.url}/explain", json={"image_base64": encoded(png_bytes()), "method": "guided_backprop"},
                      headers=auth(key), timeout=60)
    assert live.status_code == 200, live.text
    assert wait_for_metric(server, "lantern_explanation_runs_total", abandoned + 1, deployment="slow",
                           outcome="abandoned") == abandoned + 1
    assert poll(server, key, job_id)["state"] == "running"  # the job goes on

    time.sleep(1.5)  # its explanation made again
    cancelled = httpx.delete(f"{server.url}{JOBS}/{job_id}", headers=auth(key), timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert wait_for_metric(server, "lantern_explanation_runs_total", abandoned + 2, deployment="slow",
                           outcome="abandoned") == abandoned + 2
    assert server.metric("lantern_explanation_runs_total", deployment="slow", outcome="completed") == 0
    again = httpx.delete(f"{server.url}{JOBS}/{job_id}", headers=auth(key), timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    unfinished = result(server, key, job_id)
    assert unfinished.status_code == 409 and "is cancelled" in unfinished.json()["error"]["message"]


def test_the_queue_limit_refuses_at_once(server: Server, key: str) -> None:
    body = {"image_base64": encoded(png_bytes()), **SLOW_IG}
    queued = [submit(server, key, headers={"x-lantern-deployment": "slow"}, json=body) for _ in range(3)]
    try:
        assert [answer.status_code for answer in queued] == [202] * 3
        refused = submit(server, key, json={"image_base64": encoded(png_bytes()), **IG})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_jobs"
        assert "3 explanation jobs queued or running" in refused.json()["error"]["message"]
        waiting = result(server, key, queued[-1].json()["id"])
        assert waiting.status_code == 409 and waiting.json()["error"]["code"] == "job_not_finished"
    finally:
        for answer in queued:
            httpx.delete(f"{server.url}{JOBS}/{answer.json()['id']}", headers=auth(key), timeout=30)
    for answer in queued:
        assert wait(server, key, answer.json()["id"])["state"] == "cancelled"
    # the worker runs one job at a time: a job after them done means the cancelled one's explanation has stopped
    after = submit(server, key, json={"image_base64": encoded(png_bytes()), "method": "guided_backprop"})
    assert wait(server, key, after.json()["id"])["state"] == "succeeded"


@pytest.mark.parametrize(("request_fields", "status", "code", "message"), [
    ({"json": {"images": [encoded(png_bytes())] * 5}}, 413, "too_many_images",
     "5 images in one job; the limit is 4 (limits.max_images_per_job)"),
    ({"json": {"image_base64": encoded(png_bytes()), "images": [encoded(png_bytes())]}}, 422, "invalid_request",
     "give either image_base64 (one image) or images (a batch)"),
    ({"json": {"image_base64": encoded(png_bytes()), "method": "xrai", "params": {"n_steps": 1}}}, 422,
     "invalid_explanation", "n_steps"),
    ({"json": {"image_base64": encoded(png_bytes()), "params": {"internal_batch_size": 4}}}, 422, "invalid_params",
     "internal_batch_size is set by the server"),
    ({"json": {"image_base64": encoded(png_bytes()), "targets": ["hexagon"]}}, 422, "invalid_targets",
     "unknown target label(s) hexagon"),
    ({"json": {"images": ["https://example.com/cat.png"]}}, 400, "url_not_accepted", "images[0] holds a URL"),
    ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "missing_image", "send an image"),
])
def test_refusals_say_what_was_wrong(server: Server, key: str, request_fields: dict, status: int, code: str,
                                     message: str) -> None:
    fields = dict(request_fields)
    answer = submit(server, key, headers=fields.pop("headers", None), **fields)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code and message in answer.json()["error"]["message"]


def test_jobs_take_a_scoring_key(server: Server, key: str) -> None:
    accepted = submit(server, key, json={"image_base64": encoded(png_bytes()), "method": "guided_backprop"})
    job_id = accepted.json()["id"]
    for method, path in (("POST", JOBS), ("GET", f"{JOBS}/{job_id}"), ("GET", f"{JOBS}/{job_id}/result"),
                         ("DELETE", f"{JOBS}/{job_id}")):
        for headers in ({}, {"Authorization": "Bearer not-a-key"}):
            answer = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30)
            assert answer.status_code == 401, (method, path, answer.text)
    unknown = httpx.get(f"{server.url}{JOBS}/{job_id[:-2]}xx", headers=auth(key), timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_job"
    assert wait(server, key, job_id)["state"] == "succeeded"


def test_lantern_explain_runs_a_job_on_the_endpoint(server: Server, key: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "circle.png").write_bytes(png_bytes())
    (folder / "square.png").write_bytes(png_bytes(shape="square"))
    env = {**os.environ, "LANTERN_API_KEY": key}

    def lantern(*arguments: str) -> subprocess.CompletedProcess:
        done = subprocess.run([lantern_executable(), "explain", *arguments], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        return done

    one = lantern(str(folder / "circle.png"), "--url", server.url, "--job", "--method", "integrated_gradients",
                  "--param", "n_steps=8", "--out", str(tmp_path / "one.png"), "--attributions", str(tmp_path / "a.npy"))
    summary = json.loads(one.stdout)
    assert (summary["deployment"], summary["method"], summary["images"]) == ("blue", "integrated_gradients", 1)
    assert "accepted" in one.stderr and summary["fidelity"]["params"]["n_steps"] == 8
    assert Image.open(tmp_path / "one.png").format == "PNG"
    assert np.load(tmp_path / "a.npy").shape == (1, 3, 32, 32)

    batch = lantern(str(folder), "--url", server.url, "--job", "--method", "guided_backprop", "--deployment", "green",
                    "--out-dir", str(tmp_path / "out"))
    summary = json.loads(batch.stdout)
    assert (summary["deployment"], summary["images"], summary["failed"]) == ("green", 2, [])
    document = json.loads((tmp_path / "out" / "result.json").read_text())
    assert [row["name"] for row in document["results"]] == ["circle.png", "square.png"]
    assert all((tmp_path / "out" / e["visualization"]).is_file() for row in document["results"]
               for e in row["explanations"])

    # the refusals in this process (lantern_here): the same command and exit status, without a process's imports
    monkeypatch.delenv("LANTERN_API_KEY", raising=False)
    refused = lantern_here("explain", str(folder / "circle.png"), "--url", server.url, "--job", exit_code=2)
    assert "--key or $LANTERN_API_KEY" in refused.stderr
    both = lantern_here("explain", str(folder / "circle.png"), "--url", server.url, "--model", "models:/mc/1",
                        exit_code=2)
    assert "not both" in both.stderr
