"""Adaptive batching of predictions with BentoML's dispatcher (the CORK algorithm behind `batchable=True` APIs).

Each model a batch can run gets a dispatcher with its `max_batch_size` and `max_latency_ms`: deployments serving the
same model version on the same backend and device, with the same input size and batching settings, share one, so a
batch may mix their requests (`SharedBatchers`). Dispatchers on the same device share one semaphore, so one batch at
a time runs per device. The dispatcher is the one BentoML's server builds for batchable APIs; it is used directly
because predictions arrive through Lantern's own routes (which own the status codes, headers and auth), not through a
`@bentoml.api` body."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher, NonBlockSema, Optimizer

from registry.detector_onnx import graph_settings
from registry.devices import device_key
from serving.config import DeploymentConfig
from serving.runtime.deployment import Deployment
from serving.runtime.errors import NotAnswering, Overloaded
from serving.runtime.metrics import metrics
from serving.runtime.predictors import Predictor

logger = logging.getLogger("lantern.serving")
RECHECK_S = 0.05  # while the device is busy, the queue's max_latency_ms check runs at least this often


@dataclass
class Job:
    """One image for a deployment, with the predictor of the generation that admitted its request (the batch it leads
    runs on it); `abandoned` is set when its request is gone, so the batch skips it."""

    pixels: np.ndarray  # [3, H, W] float32, normalised
    deployment: str  # the name of the deployment the image was sent to (its metrics)
    predictor: Predictor
    abandoned: bool = field(default=False)
    queued_at: float = field(default_factory=time.monotonic)


def _overloaded() -> None:
    raise Overloaded("BentoML's dispatcher dropped the job: it could not be served within max_latency_ms")


class SendWhenFree(Optimizer):
    """BentoML's batching optimizer, without holding batches back: the dispatcher sends what is queued as soon as the
    device is free, and under load a batch fills while the one before it runs.

    CORK holds a batch back while `n * (time since the last arrival + o_a) <= 0.95 * wait`, where `wait` is the mean
    time the last 50 batches waited before they were sent. That mean counts time spent queued behind a busy device,
    so after a burst a lone request was held back for a share of the burst's queueing delay, for minutes (the mean is
    refreshed every 5 s, and at one request at a time shrinks 5 % per refresh). Served resnet50 on 2 cores
    (max_batch_size 32): 8 s at concurrency 32, then one client got p50 100 ms and 8 requests/s, against 24 ms and
    40 requests/s before the burst; sending when free, 24 ms after it too, with the burst as fast (40 requests/s).
    BentoML's latency model (o_a, o_b) still drops requests that cannot be served within max_latency_ms."""

    wait = property(lambda self: 0.0, lambda self, value: None)


class DeviceSemaphore(NonBlockSema):
    """BentoML's non-blocking semaphore (one batch at a time on a device, shared by the dispatchers of the device's
    deployments) that also wakes the dispatchers waiting for it when a batch ends. All on the event loop's thread."""

    def __init__(self, count: int = 1) -> None:
        super().__init__(count)
        self._released = asyncio.Event()

    def release(self) -> None:
        super().release()
        self._released.set()  # wakes every dispatcher waiting now; the first to run takes the device

    async def wait_released(self, timeout_s: float) -> None:
        """Until a batch on the device ends, or `timeout_s` passes."""
        self._released.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._released.wait()
        except TimeoutError:
            pass


class PromptDispatcher(CorkDispatcher):
    """BentoML's CorkDispatcher, whose next batch starts when the device's batch before it ends, rather than at the
    next of its 1 ms polls.

    While the device is busy, BentoML's controller sleeps `TICKET_INTERVAL` (1 ms) and looks again, so the device
    would stand idle up to a poll between batches whenever requests arrive during a batch (as they do, each after its
    own decoding): with millisecond model calls (small GPU batches), a large share of its time. Deployments sharing the
    device take turns (the one waiting longest runs next). The rest is BentoML's controller: its training phases, its
    latency model's drops past max_latency_ms (checked at least every `RECHECK_S` while the device is busy), and its
    optimizer's hold-back (which `SendWhenFree` turns off)."""

    _sema: DeviceSemaphore

    async def controller(self) -> None:
        try:
            skipped = self.optimizer.N_SKIPPED_SAMPLE  # BentoML's training phases, as its controller runs them
            await self.train_optimizer(skipped, skipped + 6, 1)
            for required, size in ((6, 1), (5, 2), (3, 3)):
                await self.train_optimizer(required, 1, size)
                self.optimizer.trigger_refresh()
        except Exception:  # noqa: BLE001 - as BentoML's: serve untrained rather than not at all
            logger.exception("batching: training the dispatcher's latency model failed")
        while True:
            try:
                await self._dispatch_next()
            except Exception:  # noqa: BLE001 - as BentoML's: one bad round never stops the dispatcher
                logger.exception("batching: dispatching a batch failed")

    async def _dispatch_next(self) -> None:
        async with self._wake_event:  # until a request is queued
            await self._wake_event.wait_for(self._queue.__len__)
        n = len(self._queue)
        now = time.time()
        w0 = now - self._queue[0].enqueue_time  # the first request's wait, and the last one's
        wn = now - self._queue[-1].enqueue_time
        latency_0 = w0 + self.optimizer.o_a * n + self.optimizer.o_b
        if n > 1 and latency_0 >= self.max_latency:
            self._queue.popleft().future.cancel()
            return
        if self._sema.is_locked():
            if n == 1 and w0 >= self.max_latency:
                self._queue.popleft().future.cancel()
                return
            left = self.max_latency - (latency_0 if n > 1 else w0)
            await self._sema.wait_released(min(RECHECK_S, left))
            return
        if n < self.max_batch_size and \
                n * (wn + self.TICKET_INTERVAL + (self.optimizer.o_a or 0)) <= self.optimizer.wait * 0.95:
            await asyncio.sleep(self.TICKET_INTERVAL)  # CORK's hold-back (never, with SendWhenFree)
            return
        self._sema.acquire()
        self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))


class BatchedPredictor:
    """`await predictor.logits(job)` -> that image's logits, computed in an adaptive batch.

    The jobs of one batcher may come for several deployments, which all serve the same model: a batch runs on the
    predictor its first live job carries (a generation is not unloaded while a request routed to it is in flight)."""

    def __init__(self, config: DeploymentConfig, semaphore: DeviceSemaphore) -> None:
        self.dispatcher = PromptDispatcher(
            max_latency_in_ms=config.max_latency_ms, max_batch_size=config.max_batch_size,
            shared_sema=semaphore, fallback=_overloaded, get_batch_size=lambda job: 1,
        )
        self.dispatcher.optimizer = SendWhenFree(self.dispatcher.max_latency)
        self._call = self.dispatcher(self._run_batch)
        self._call_limit_s = config.max_latency_ms / 1000

    async def _run_batch(self, jobs: Sequence[Job]) -> list[np.ndarray | Exception | None]:
        live = [i for i, job in enumerate(jobs) if not job.abandoned]
        results: list[np.ndarray | Exception | None] = [None] * len(jobs)
        if not live:
            return results
        predictor = jobs[live[0]].predictor
        started = time.monotonic()
        for i in live:
            metrics().queue_seconds.labels(jobs[i].deployment).observe(started - jobs[i].queued_at)
        names = sorted({jobs[i].deployment for i in live})
        try:
            logits = await self._model_call(predictor, [jobs[i].pixels for i in live], names)
        except NotAnswering as error:  # not an input's fault: no retry one by one
            for i in live:
                results[i] = error
            return results
        except Exception:  # noqa: BLE001 - find the input(s) the model fails on: the others still get answers
            if len(live) == 1:
                raise
            return await self._run_one_by_one(jobs, live, results)
        for row, i in enumerate(live):
            results[i] = logits[row]
        return results

    async def _run_one_by_one(self, jobs: Sequence[Job], live: list[int],
                              results: list[np.ndarray | Exception | None]) -> list[np.ndarray | Exception | None]:
        for i in live:
            try:
                job = jobs[i]
                results[i] = (await self._model_call(job.predictor, [job.pixels], [job.deployment]))[0]
            except Exception as error:  # noqa: BLE001 - this input is the caller's 424
                results[i] = error
        return results

    async def _model_call(self, predictor, rows: list[np.ndarray], names: list[str]) -> np.ndarray:
        """One model call on the predictor's own thread; a call that answers counts in the batch size and model call
        metrics of each deployment with an image in it. A call that takes longer than max_latency_ms is no longer
        waited for: a stuck backend must not hold the device's batches (every deployment's on that device) forever,
        also after liveness probes have reloaded the model."""
        started = time.monotonic()
        try:
            logits = await asyncio.wait_for(asyncio.wrap_future(predictor.submit(rows)), self._call_limit_s)
        except TimeoutError:
            logger.warning("deployment %s: a model call of %d image(s) did not answer within max_latency_ms (%.0f ms);"
                           " its images get a 503 and the device goes on to the next batch", ", ".join(names),
                           len(rows), 1000 * self._call_limit_s)
            raise NotAnswering(f"the model did not answer within max_latency_ms ({1000 * self._call_limit_s:.0f} "
                               f"ms)") from None
        took = time.monotonic() - started
        for name in names:
            metrics().model_call_seconds.labels(name).observe(took)
            metrics().batch_size.labels(name).observe(len(rows))
        return logits

    async def logits(self, job: Job) -> np.ndarray:
        try:
            result = await self._call(job)
        except asyncio.CancelledError:
            job.abandoned = True
            raise
        except Overloaded:
            job.abandoned = True
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the dispatcher turns our cancellation into its fallback
                raise asyncio.CancelledError() from None
            raise
        if isinstance(result, Exception):
            raise result
        return result

    def shutdown(self) -> None:
        """Stop the dispatcher (from any thread: its controller task lives on the event loop that first used it)."""
        loop = self.dispatcher.__dict__.get("_loop")
        if loop is None or loop.is_closed():
            self.dispatcher.shutdown()
            return
        try:
            loop.call_soon_threadsafe(self.dispatcher.shutdown)
        except RuntimeError:  # the loop is closing with the server
            pass


class SharedBatchers:
    """One worker's batchers, one per model a batch can run, and one semaphore per device.

    Deployments share a batcher when their batches could be one model call: the same registered model version (an
    alias resolved), run by the same backend and provider on the same device, with the same input size and the same
    `max_batch_size` and `max_latency_ms`. Blue and green serving one version with different request settings, or a
    mirror of the live version, then fill batches together. A batcher stops when its last user releases it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # instances stop on other threads (retirement)
        self._semaphores: dict[str, DeviceSemaphore] = {}
        self._batchers: dict[tuple, BatchedPredictor] = {}
        self._users: dict[tuple, set[int]] = {}

    def semaphore(self, device: str) -> DeviceSemaphore:
        """`device`'s batch slot (`auto`, `cpu` or `cuda:0` spelled one way: they share one)."""
        with self._lock:
            return self._semaphores.setdefault(device_key(device), DeviceSemaphore(1))

    @staticmethod
    def key(deployment: Deployment) -> tuple:
        """What a batch's model call depends on, for a loaded deployment."""
        model, config = deployment.require_model(), deployment.config
        shape = model.preprocess.crop_size if model.preprocess is not None else graph_settings(model.settings)
        return (model.bundle.uri, model.predictor.description, device_key(config.device), shape,
                config.max_batch_size, config.max_latency_ms)

    def acquire(self, user: object, deployment: Deployment) -> tuple[tuple, BatchedPredictor]:
        """The batcher for `deployment`'s model, registering `user` (a deployment instance) as one of its users."""
        key = self.key(deployment)
        semaphore = self.semaphore(deployment.config.device)
        with self._lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = self._batchers[key] = BatchedPredictor(deployment.config, semaphore)
            self._users.setdefault(key, set()).add(id(user))
        return key, batcher

    def release(self, user: object, key: tuple) -> None:
        """`user` is done with the batcher of `key`; the last user's release stops it."""
        with self._lock:
            users = self._users.get(key, set())
            users.discard(id(user))
            if users:
                return
            self._users.pop(key, None)
            batcher = self._batchers.pop(key, None)
        if batcher is not None:
            batcher.shutdown()
