"""Adaptive batching (serving/runtime/batching.py) in-process: BentoML's dispatcher, sending batches as soon as the device is
free: not held back by the mean of past waits, and not waiting for a poll once the device's batch before it ends."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import numpy as np
import pytest
from bentoml._internal.marshal.dispatcher import Optimizer

from serving.config import DeploymentConfig
from serving.runtime import batching
from serving.runtime.batching import BatchedPredictor, DeviceSemaphore, Job, SharedBatchers
from serving.runtime.deployment import Deployment
from serving.runtime.errors import NotAnswering, Overloaded
from support.common import LABELS, SMALL_SETTINGS


def job_for(image: np.ndarray, deployment: Deployment) -> Job:
    """One image for `deployment`, with the predictor of its loaded model (as the endpoint admits it)."""
    return Job(image, deployment.name, deployment.require_model().predictor)


def test_batches_are_sent_when_the_device_is_free_whatever_earlier_batches_waited(store: str,
                                                                                  checkpoints: dict[str, Path]) -> None:
    """After a burst, batches had waited 0.5 s in the queue behind the device. BentoML's optimizer then holds a lone
    request back until the next arrives or ~0.5 s pass; ours sends it at once: two requests 50 ms apart make two
    model calls of one image each, and its latency model still learns the call's cost."""
    from registry.register import register_checkpoint

    register_checkpoint("batched", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/batched/1", device="cpu"))
    assert deployment.load(), deployment.reason
    batcher = BatchedPredictor(deployment.config, DeviceSemaphore(1))
    optimizer = batcher.dispatcher.optimizer
    reference = Optimizer(batcher.dispatcher.max_latency)
    for logged in (optimizer, reference):
        for n in (1, 2, 4, 8) * 15:  # a burst: big batches that each waited 0.5 s behind the one before
            logged.log_outbound(n=n, wait=0.5, duration=0.002 + 0.001 * n)
        logged.trigger_refresh()
    assert reference.wait > 0.4  # BentoML's: a lone request would be held back ~0.45 s
    assert optimizer.wait == 0 and 0.0005 < optimizer.o_a < 0.002 and 0.001 < optimizer.o_b < 0.003

    crop = deployment.require_model().settings.valid_crop_size
    image = np.zeros((3, crop, crop), dtype=np.float32)

    async def pairs_apart() -> None:
        for _ in range(8):  # the last pairs come after the dispatcher's training requests (11)
            first = asyncio.ensure_future(batcher.logits(job_for(image, deployment)))
            await asyncio.sleep(0.05)
            await asyncio.gather(first, batcher.logits(job_for(image, deployment)))
        batcher.shutdown()

    try:
        asyncio.run(pairs_apart())
        assert [n for n, _, _ in list(optimizer.o_stat)[-4:]] == [1, 1, 1, 1]
    finally:
        deployment.unload()
        gc.unfreeze()


def test_a_queued_batch_starts_when_the_device_is_released_and_a_lone_one_still_expires(
        store: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another deployment's batch holds the device (the shared semaphore) while a request queues: it runs when that
    batch ends, not at a poll (BentoML's polled every TICKET_INTERVAL; here that and the recheck are 30 s, so only
    the release can start it). A request queued behind the device past max_latency_ms is still dropped (503)."""
    from registry.register import register_checkpoint

    register_checkpoint("prompt", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/prompt/1", device="cpu",
                                             max_latency_ms=400))
    assert deployment.load(), deployment.reason
    semaphore = DeviceSemaphore(1)
    batcher = BatchedPredictor(deployment.config, semaphore)
    crop = deployment.require_model().settings.valid_crop_size
    image = np.zeros((3, crop, crop), dtype=np.float32)

    async def scenario() -> None:
        for _ in range(14):  # the dispatcher's training requests (11), one at a time
            await batcher.logits(job_for(image, deployment))
        calls = len(batcher.dispatcher.optimizer.o_stat)
        batcher.dispatcher.TICKET_INTERVAL = 30
        monkeypatch.setattr(batching, "RECHECK_S", 30)

        assert semaphore.acquire()  # another deployment's batch is running on the device
        queued = asyncio.ensure_future(batcher.logits(job_for(image, deployment)))
        await asyncio.sleep(0.2)
        assert not queued.done()
        semaphore.release()
        logits = await asyncio.wait_for(queued, 10)  # 30 s if it waited for a poll
        assert logits.shape == (len(LABELS),)
        assert [n for n, _, _ in list(batcher.dispatcher.optimizer.o_stat)[calls:]] == [1]

        monkeypatch.setattr(batching, "RECHECK_S", 0.05)
        assert semaphore.acquire()
        expired = asyncio.ensure_future(batcher.logits(job_for(image, deployment)))
        with pytest.raises(Overloaded):
            await asyncio.wait_for(expired, 10)  # dropped once it has waited max_latency_ms (0.4 s)
        semaphore.release()
        batcher.shutdown()

    try:
        asyncio.run(scenario())
    finally:
        deployment.unload()
        gc.unfreeze()


def test_max_batch_size_1_turns_batching_off(store: str, checkpoints: dict[str, Path]) -> None:
    """`max_batch_size: 1`: 40 images queued at once (past the dispatcher's training phases, which ask for batches of
    2 and 3) all get their logits, each from a model call of its own, equal to a batch-1 run of the predictor."""
    from registry.register import register_checkpoint

    register_checkpoint("unbatched", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/unbatched/1", device="cpu",
                                             max_batch_size=1))
    assert deployment.load(), deployment.reason
    batcher = BatchedPredictor(deployment.config, DeviceSemaphore(1))
    crop = deployment.require_model().settings.valid_crop_size
    images = np.random.default_rng(0).normal(size=(40, 3, crop, crop)).astype(np.float32)

    async def at_once() -> list[np.ndarray]:
        try:
            jobs = (batcher.logits(job_for(image, deployment)) for image in images)
            return await asyncio.wait_for(asyncio.gather(*jobs), 60)
        finally:
            batcher.shutdown()

    try:
        logits = asyncio.run(at_once())
        assert [n for n, _, _ in batcher.dispatcher.optimizer.o_stat] == [1] * len(batcher.dispatcher.optimizer.o_stat)
        assert len(batcher.dispatcher.optimizer.o_stat) >= 20  # its last 50 calls are kept
        predictor = deployment.require_model().predictor
        for image, got in zip(images, logits):
            np.testing.assert_allclose(got, predictor(image[None])[0], rtol=1e-5, atol=1e-5)
    finally:
        deployment.unload()
        gc.unfreeze()


def test_deployments_of_one_model_share_a_batcher_and_a_batch_mixes_their_requests(
        store: str, checkpoints: dict[str, Path]) -> None:
    """Blue (version 1) and green (the alias naming version 1, other request settings) share one batcher: their images
    queued behind a busy device go out as one model call of 2. Another version, another input size or another
    max_batch_size is another batcher. The batcher stops with its last user; the next user gets a new one."""
    from registry.register import register_checkpoint

    for alias in ("champion", None):
        register_checkpoint("mixed", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                            alias=alias)
    configs = {"blue": {"model": "models:/mixed/1"},
               "green": {"model": "models:/mixed@champion", "request_settings": {"request_timeout_ms": 90000}},
               "version2": {"model": "models:/mixed/2"},
               "crop24": {"model": "models:/mixed/1", "settings": {"valid_resize_size": 30, "valid_crop_size": 24}},
               "batch8": {"model": "models:/mixed/1", "max_batch_size": 8}}
    deployments = {name: Deployment(DeploymentConfig(name=name, device="cpu", **config))
                   for name, config in configs.items()}
    for deployment in deployments.values():
        assert deployment.load(), deployment.reason
    blue, green = deployments["blue"], deployments["green"]
    batchers = SharedBatchers()
    acquired = {name: batchers.acquire(deployment, deployment) for name, deployment in deployments.items()}
    shared = acquired["blue"][1]
    assert acquired["green"][1] is shared
    assert len({id(batcher) for _key, batcher in acquired.values()}) == 4
    semaphore = batchers.semaphore("auto")  # the CPU's batch slot, however it is spelled
    assert semaphore is batchers.semaphore("cpu")
    crop = blue.require_model().settings.valid_crop_size
    images = np.random.default_rng(1).normal(size=(2, 3, crop, crop)).astype(np.float32)

    async def mixed() -> list[np.ndarray]:
        for i in range(14):  # the dispatcher's training requests (11), one at a time, from both deployments
            await shared.logits(job_for(images[0], blue if i % 2 else green))
        calls = len(shared.dispatcher.optimizer.o_stat)
        assert semaphore.acquire()  # another batch holds the device while both images queue
        queued = [asyncio.ensure_future(shared.logits(job_for(image, deployment)))
                  for image, deployment in zip(images, (blue, green))]
        await asyncio.sleep(0.2)
        semaphore.release()
        logits = await asyncio.wait_for(asyncio.gather(*queued), 10)
        assert [n for n, _, _ in list(shared.dispatcher.optimizer.o_stat)[calls:]] == [2]
        return logits

    try:
        logits = asyncio.run(mixed())
        for image, got, deployment in zip(images, logits, (blue, green)):
            expected = deployment.require_model().predictor(image[None])[0]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        batchers.release(blue, acquired["blue"][0])
        assert batchers.acquire(green, green)[1] is shared  # green still uses it
        batchers.release(green, acquired["green"][0])
        assert batchers.acquire(blue, blue)[1] is not shared  # stopped with its last user
    finally:
        for deployment in deployments.values():
            deployment.unload()
        gc.unfreeze()


def test_a_stuck_model_call_frees_the_device_and_the_reloaded_model_serves(store: str,
                                                                          checkpoints: dict[str, Path]) -> None:
    """A model call that does not answer within max_latency_ms fails its images (503) and frees the device. Before,
    the stuck call kept the device's batch slot, so no batch of any deployment on that device ran again, also after
    liveness probes had reloaded the model. The stuck call here is the backend's thread kept busy, as a hung kernel
    keeps it."""
    from registry.register import register_checkpoint

    register_checkpoint("stuck", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/stuck/1", device="cpu", max_latency_ms=1000))
    assert deployment.load(), deployment.reason
    batcher = BatchedPredictor(deployment.config, DeviceSemaphore(1))
    crop = deployment.require_model().settings.valid_crop_size
    image = np.zeros((3, crop, crop), dtype=np.float32)
    hung = threading.Event()
    deployment.require_model().predictor.thread.submit(hung.wait)

    async def stuck_then_reloaded() -> np.ndarray:
        with pytest.raises(NotAnswering):
            await asyncio.wait_for(batcher.logits(job_for(image, deployment)), 30)
        assert await asyncio.to_thread(deployment.load, True), deployment.reason  # what failed liveness probes do
        logits = await asyncio.wait_for(batcher.logits(job_for(image, deployment)), 30)
        batcher.shutdown()
        return logits

    try:
        logits = asyncio.run(stuck_then_reloaded())
        np.testing.assert_allclose(logits, deployment.require_model().predictor(image[None])[0], rtol=1e-5, atol=1e-5)
    finally:
        hung.set()
        deployment.unload()
        gc.unfreeze()
