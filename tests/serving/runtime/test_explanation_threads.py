"""`limits.explanation_threads`: an explanation's torch CPU work (and XRAI's segmentation threads) runs on that many
threads, and only explanations do: predictions, the event loop and threads started later keep torch's count.
`torch.set_num_threads` would not do: it changes the count every thread started after it takes."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

import serving.runtime.deployment
from explain.cpu_threads import limit_this_thread, region_threads
from serving.config import DeploymentConfig, EndpointConfig, Limits, Probe
from serving.runtime.endpoint import Endpoint
from support.common import LABELS, SMALL_SETTINGS
from support.servers import in_process_client, png_bytes

DEFAULT_THREADS = torch.get_num_threads()
needs_two_cores = pytest.mark.skipif(DEFAULT_THREADS < 2, reason="torch runs on one thread here: nothing to limit")


def in_new_thread(work: Callable[[], Any]) -> Any:
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


@needs_two_cores
def test_the_limit_holds_for_the_thread_that_sets_it_alone() -> None:
    def limited() -> tuple[int, int, int]:
        return limit_this_thread(1), torch.get_num_threads(), region_threads(6)

    assert in_new_thread(limited) == (1, 1, 1)
    assert torch.get_num_threads() == DEFAULT_THREADS  # this thread
    assert in_new_thread(torch.get_num_threads) == DEFAULT_THREADS  # a thread started after it
    assert region_threads(6) == min(6, DEFAULT_THREADS)


@pytest.fixture(scope="module")
def endpoint(module_store: str, checkpoints: dict[str, Path]) -> Iterator[tuple[Endpoint, TestClient]]:
    """A real endpoint whose explanations run on one CPU thread, and its HTTP app in-process (one client: the
    batcher belongs to the client's event loop)."""
    from registry.register import register_checkpoint

    register_checkpoint("threads", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    blue = DeploymentConfig(name="blue", model="models:/threads/1", device="cpu",
                            readiness_probe=Probe(initial_delay=0, period=0.05))
    served = Endpoint(EndpointConfig(name="threads", auth_mode="none", deployments=[blue], traffic={"blue": 100},
                                     limits=Limits(explanation_threads=1)), tracking_uri=module_store)
    with in_process_client(served) as client:
        yield served, client


@needs_two_cores
@pytest.mark.parametrize("method", ["xrai", "integrated_gradients", "guided_backprop"])
def test_explanations_run_on_the_configured_threads_and_other_threads_keep_theirs(
        endpoint: tuple[Endpoint, TestClient], monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    served, client = endpoint
    seen: list[tuple[str, int, int]] = []
    attribute = serving.runtime.deployment.attribute

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append((threading.current_thread().name, torch.get_num_threads(), region_threads(6)))
        return attribute(*args, **kwargs)

    monkeypatch.setattr(serving.runtime.deployment, "attribute", counting)
    steps = "" if method == "guided_backprop" else "&n_steps=4"
    explained = client.post(f"/explain?method={method}{steps}", content=png_bytes(32, "circle"),
                            headers={"Content-Type": "image/png"})
    assert explained.status_code == 200, explained.text
    predicted = client.post("/predict", content=png_bytes(32, "circle"), headers={"Content-Type": "image/png"})
    assert predicted.status_code == 200, predicted.text
    assert [(name.split("_")[0], threads, regions) for name, threads, regions in seen] == [("lantern-explain", 1, 1)]
    assert in_new_thread(torch.get_num_threads) == DEFAULT_THREADS
    assert served.inference.work_pool.submit(torch.get_num_threads).result() == DEFAULT_THREADS  # decoding threads


@needs_two_cores
def test_explanation_jobs_compute_on_the_live_threads_unless_told() -> None:
    """A job's explanations take as many threads as live ones (they yield the cores by priority, below), unless
    `limits.job_explanation_threads` says otherwise."""
    from serving.runtime.inference import Inference

    for limits, expected in ((Limits(), DEFAULT_THREADS),
                             (Limits(explanation_threads=1), 1),
                             (Limits(explanation_threads=2, job_explanation_threads=1), 1)):
        inference = Inference(limits)
        try:
            assert inference.job_pool.submit(torch.get_num_threads).result() == expected, limits
        finally:
            inference.stop()


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own CPU priority is Linux's")
def test_explanation_jobs_run_at_the_lowest_cpu_priority_and_live_work_does_not() -> None:
    """The job pool's threads, and the threads they start (OpenMP's team, XRAI's segmentation pool), run at nice
    `limits.job_cpu_niceness` (19 by default): the kernel gives live predictions and explanations the cores first.
    The live pools, the event loop's thread and threads started later keep the process's priority."""
    from serving.runtime.inference import Inference

    own = niceness()
    for limits, expected in ((Limits(), 19), (Limits(job_cpu_niceness=5), max(own, 5))):
        inference = Inference(limits)
        try:
            def started_by_a_job_thread() -> int:
                return in_new_thread(niceness)

            assert inference.job_pool.submit(niceness).result() == expected, limits
            assert inference.job_pool.submit(started_by_a_job_thread).result() == expected, limits
            assert inference.explain_pool.submit(niceness).result() == own
            assert inference.work_pool.submit(niceness).result() == own
            assert niceness() == own and in_new_thread(niceness) == own
        finally:
            inference.stop()
