"""Deadlines, abandonment, admission and adaptive batching, seen from outside the server."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest

from support.scoring import auth, slow_explain, wait_for_metric
from support.servers import Server, png_bytes


def test_request_over_its_timeout_is_408_and_its_work_is_abandoned(server: Server, key: str) -> None:
    before = server.metric("lantern_explanation_runs_total", deployment="slow", outcome="abandoned")
    response = slow_explain(server, key, "slow")
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert response.headers["x-lantern-deployment"] == "slow"
    # the explanation stops at its next forward pass instead of running its 1024 steps for nobody
    assert wait_for_metric(server, "lantern_explanation_runs_total", before + 1, deployment="slow",
                           outcome="abandoned") == before + 1
    assert server.metric("lantern_explanation_runs_total", deployment="slow", outcome="completed") == 0
    assert server.metric("lantern_abandoned_requests_total", deployment="slow", reason="timeout") >= 1


def test_client_disconnect_abandons_the_work(server: Server, key: str) -> None:
    before = server.metric("lantern_explanation_runs_total", deployment="torchy", outcome="abandoned")
    with pytest.raises(httpx.TimeoutException):
        slow_explain(server, key, "torchy", timeout=1.5)
    assert wait_for_metric(server, "lantern_explanation_runs_total", before + 1, deployment="torchy",
                           outcome="abandoned") == before + 1
    assert wait_for_metric(server, "lantern_abandoned_requests_total", 1, deployment="torchy",
                           reason="disconnect") >= 1
    assert server.metric("lantern_explanation_runs_total", deployment="torchy", outcome="completed") == 0


def test_more_in_flight_than_allowed_is_429_at_once(server: Server, key: str) -> None:
    # predictions: max 1 at a time on `slow`, no queue wait, so concurrent requests beyond one are refused
    image = png_bytes(size=448)
    statuses: list[int] = []
    together = threading.Barrier(24)

    def one() -> None:
        together.wait()  # all at once, so more than two are in flight however fast the server answers
        response = httpx.post(f"{server.url}/predict", content=image, timeout=60,
                              headers=auth(key, **{"Content-Type": "image/png", "x-lantern-deployment": "slow"}))
        statuses.append(response.status_code)

    threads = [threading.Thread(target=one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0

    # explanations have their own limit (1 at a time here): while one runs, another is refused at once (`slow` has no
    # queue wait) and prediction traffic still flows; the first is then abandoned by its client
    before = server.metric("lantern_explanation_runs_total", deployment="torchy", outcome="abandoned")
    first: list[BaseException] = []

    def long_explanation() -> None:
        body = {"image_base64": base64.b64encode(png_bytes()).decode(), "method": "xrai", "params": {"n_steps": 1024}}
        try:
            httpx.post(f"{server.url}/explain", json=body, headers=auth(key, **{"x-lantern-deployment": "torchy"}),
                       timeout=5)
        except httpx.TimeoutException as error:
            first.append(error)

    worker = threading.Thread(target=long_explanation)
    worker.start()
    time.sleep(1.0)
    second = slow_explain(server, key, "slow")
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_requests"
    assert "explanations" in second.json()["error"]["message"]
    prediction = httpx.post(f"{server.url}/predict", content=png_bytes(), headers=auth(key, **{"Content-Type": "image/png"}))
    assert prediction.status_code == 200
    worker.join()
    assert first, "the long explanation should still have been running when its client gave up"
    assert wait_for_metric(server, "lantern_explanation_runs_total", before + 1, deployment="torchy",
                           outcome="abandoned") == before + 1


def test_adaptive_batching_batches_concurrent_requests(server: Server, key: str) -> None:
    image = png_bytes()
    before = server.metric("lantern_batch_size_count", deployment="blue")
    images_before = server.metric("lantern_images_total", deployment="blue")
    queued_before = server.metric("lantern_batch_queue_seconds_count", deployment="blue")
    prepared_before = server.metric("lantern_preprocess_seconds_count", deployment="blue")
    model_calls_before = server.metric("lantern_model_call_seconds_count", deployment="blue")
    model_seconds_before = server.metric("lantern_model_call_seconds_sum", deployment="blue")

    def one(_: int) -> int:
        return httpx.post(f"{server.url}/predict", content=image, timeout=60,
                          headers=auth(key, **{"Content-Type": "image/png"})).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(96)))
    assert statuses == [200] * 96
    calls = server.metric("lantern_batch_size_count", deployment="blue") - before
    images = server.metric("lantern_images_total", deployment="blue") - images_before
    print(f"96 concurrent predictions: {images:.0f} images in {calls:.0f} model calls")
    assert images == 96 and calls < images
    # where the time went: each request's decoding, each image's wait in the queue, and each model call
    assert server.metric("lantern_preprocess_seconds_count", deployment="blue") - prepared_before == 96
    assert server.metric("lantern_batch_queue_seconds_count", deployment="blue") - queued_before == 96
    assert server.metric("lantern_model_call_seconds_count", deployment="blue") - model_calls_before == calls
    assert server.metric("lantern_model_call_seconds_sum", deployment="blue") > model_seconds_before
