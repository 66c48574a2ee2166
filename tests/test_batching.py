"""Adaptive batching (serving/batching.py) in-process: BentoML's dispatcher, sending batches as soon as the device is
free: not held back by the mean of past waits, and not waiting for a poll once the device's batch before it ends."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import numpy as np
import pytest
from bentoml._internal.marshal.dispatcher import Optimizer

from serving import batching
from serving.batching import BatchedPredictor, DeviceSemaphore, Job, Overloaded
from serving.config import DeploymentConfig
from serving.deployment import Deployment
from tests.conftest import LABELS, SMALL_SETTINGS


def test_batches_are_sent_when_the_device_is_free_whatever_earlier_batches_waited(store: str,
                                                                                  checkpoints: dict[str, Path]) -> None:
    """After a burst, batches had waited 0.5 s in the queue behind the device. BentoML's optimizer then holds a lone
    request back until the next arrives or ~0.5 s pass; ours sends it at once: two requests 50 ms apart make two
    model calls of one image each, and its latency model still learns the call's cost."""
    from registry.register import register_checkpoint

    register_checkpoint("batched", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/batched/1", device="cpu"))
    assert deployment.load(), deployment.reason
    batcher = BatchedPredictor(deployment, DeviceSemaphore(1))
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
            first = asyncio.ensure_future(batcher.logits(Job(image)))
            await asyncio.sleep(0.05)
            await asyncio.gather(first, batcher.logits(Job(image)))
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
    batcher = BatchedPredictor(deployment, semaphore)
    crop = deployment.require_model().settings.valid_crop_size
    image = np.zeros((3, crop, crop), dtype=np.float32)

    async def scenario() -> None:
        for _ in range(14):  # the dispatcher's training requests (11), one at a time
            await batcher.logits(Job(image))
        calls = len(batcher.dispatcher.optimizer.o_stat)
        batcher.dispatcher.TICKET_INTERVAL = 30
        monkeypatch.setattr(batching, "RECHECK_S", 30)

        assert semaphore.acquire()  # another deployment's batch is running on the device
        queued = asyncio.ensure_future(batcher.logits(Job(image)))
        await asyncio.sleep(0.2)
        assert not queued.done()
        semaphore.release()
        logits = await asyncio.wait_for(queued, 10)  # 30 s if it waited for a poll
        assert logits.shape == (len(LABELS),)
        assert [n for n, _, _ in list(batcher.dispatcher.optimizer.o_stat)[calls:]] == [1]

        monkeypatch.setattr(batching, "RECHECK_S", 0.05)
        assert semaphore.acquire()
        expired = asyncio.ensure_future(batcher.logits(Job(image)))
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
    batcher = BatchedPredictor(deployment, DeviceSemaphore(1))
    crop = deployment.require_model().settings.valid_crop_size
    images = np.random.default_rng(0).normal(size=(40, 3, crop, crop)).astype(np.float32)

    async def at_once() -> list[np.ndarray]:
        try:
            return await asyncio.wait_for(asyncio.gather(*(batcher.logits(Job(image)) for image in images)), 60)
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
