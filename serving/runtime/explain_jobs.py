"""Running explanation jobs in one worker: the oldest queued job of the endpoint is claimed (from the state database,
so any worker of any host may run it) once the explanation pool has a free slot that no live request waits for; its
images are explained one at a time in that pool, each in a slot a live `/explain` request takes back when it needs it
(the image is then explained again later). The worker beats for the job every second; a cancelled job stops within
one step of its method."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from serving.control.errors import StateUnavailable
from serving.control.jobs import ExplanationOptions, Job, JobStore, Output, PendingImage
from serving.control.jobs import ImageError as StoredImageError
from serving.runtime.abandon import CancelToken
from serving.runtime.errors import ServingError
from serving.runtime.images import EncodedImage
from serving.runtime.metrics import metrics

if TYPE_CHECKING:
    from serving.runtime.endpoint import Endpoint
    from serving.runtime.instance import DeploymentInstance

logger = logging.getLogger("lantern.serving")
POLL_S = 1.0  # how often a worker looks for queued jobs (at once after one is submitted through it)
BEAT_S = 1.0  # how often the worker running a job says so, and learns whether the job was cancelled
PURGE_S = 60.0  # how often expired results are removed
LOADING_WAIT_S = 0.5  # a job's deployment still loading: looked at again after this
LOADING_LIMIT_S = 600.0  # a job's deployment not ready after this long: the job fails


class JobCancelled(Exception):
    """The job was cancelled (or is no longer this worker's to run)."""


class JobRunner:
    """The explanation jobs of one worker's endpoint."""

    def __init__(self, endpoint: Endpoint, store: JobStore) -> None:
        self.endpoint = endpoint
        self.store = store
        self.worker = endpoint.worker
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: Job | None = None
        self._current: list[CancelToken] = []  # the token of the explanation running now
        self._problem: str | None = None  # the database's last failure, logged once

    def start(self) -> None:
        """Run from now on (on the worker's event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lantern-explain-jobs")

    def wake(self) -> None:
        """Look for a queued job now (one was just submitted through this worker)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop running jobs; one being run goes back to the queue for another worker (this try not counted)."""
        if self._task is not None:
            self._task.cancel()
        for token in self._current:
            token.cancel("the worker is stopping")
        job = self._running
        if job is not None:
            try:
                self.store.release(job.id, self.worker)
            except StateUnavailable:
                pass  # its heartbeat stops: another worker takes it back once it is stale

    async def _in_thread(self, func, *args):  # noqa: ANN001, ANN202 - the database calls, off the event loop
        return await self.endpoint.inference.in_thread(func, *args)

    async def _run(self) -> None:
        last_purge = 0.0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if time.monotonic() - last_purge > PURGE_S:
                    await self._in_thread(self.store.purge, self.endpoint.config.limits.job_result_seconds)
                    last_purge = time.monotonic()
                await self.endpoint.inference.explain_admission.idle()  # claim work only for an idle pool
                job = await self._in_thread(self.store.claim, self.worker)
                if job is not None:
                    await self._work(job)
                    self._wake.set()  # the next one at once
                if self._problem is not None:
                    logger.info("explanation jobs: the state database answers again")
                    self._problem = None
            except asyncio.CancelledError:
                raise
            except StateUnavailable as error:
                if str(error) != self._problem:
                    logger.warning("explanation jobs wait for the state database: %s", error)
                    self._problem = str(error)
            except Exception:  # noqa: BLE001 - the runner keeps running; the job's worker goes silent and is retried
                logger.exception("explanation job runner failed; it goes on")
                await asyncio.sleep(POLL_S)

    async def _instance(self, job: Job) -> DeploymentInstance | None:
        """The deployment instance the job was accepted for, once it is ready; None when the job cannot run (it is
        failed with the reason)."""
        waited_until = time.monotonic() + LOADING_LIMIT_S
        while True:
            instance = self.endpoint.instances.get(job.deployment)
            if instance is None:
                await self._in_thread(self.store.finish, job.id, self.worker,
                                      f"deployment {job.deployment} was removed before the job ran")
                return None
            version = instance.deployment.model_version
            if version is not None and version != job.model_version:
                await self._in_thread(self.store.finish, job.id, self.worker,
                                      f"deployment {job.deployment} now serves {version}; the job was accepted for "
                                      f"{job.model_version}")
                return None
            if instance.deployment.ready:
                return instance
            if time.monotonic() > waited_until:
                await self._in_thread(self.store.finish, job.id, self.worker,
                                      f"deployment {job.deployment} was not ready within {LOADING_LIMIT_S:.0f} s "
                                      f"({instance.deployment.reason or instance.deployment.state})")
                return None
            await asyncio.sleep(LOADING_WAIT_S)  # (re)loading in this worker: the heartbeat keeps the job ours

    async def _work(self, job: Job) -> None:
        """Explain the job's pending images, beating meanwhile; each image's explanations are kept as it is done."""
        self._running = job
        cancelled = asyncio.Event()
        current = self._current
        beats = asyncio.get_running_loop().create_task(self._beat(job, cancelled, current))
        if job.attempts == 1:  # its first start
            metrics().job_queue_seconds.labels(job.deployment).observe(time.time() - job.created_at)
        try:
            instance = await self._instance(job)
            if instance is None:
                return
            logger.info("explanation job %s: %d images on deployment %s (%s)", job.id, job.total, job.deployment,
                        job.options.method)
            pending = await self._plan(instance, job, cancelled)
            for image in pending:
                position, name = image.position, image.name
                data = await self._in_thread(self.store.image_bytes, job.id, position)
                while True:
                    if cancelled.is_set():
                        raise JobCancelled()
                    token = CancelToken()
                    current[:] = [token]
                    try:
                        async with self.endpoint.inference.explain_admission.background(token):
                            outputs, fidelity = await self._explain(instance, name, data, image.targets or [],
                                                                    job.options, token)
                    except asyncio.CancelledError:
                        if asyncio.current_task().cancelling() or not token.cancelled:
                            raise  # the worker is stopping
                        continue  # a live request took the slot, or the job was cancelled: see which
                    except Exception as error:  # noqa: BLE001 - this image fails, saying why; the others go on
                        kept = await self._in_thread(self.store.image_failed, job.id, self.worker, position,
                                                     self._image_error(job, position, error))
                        break
                    kept = await self._in_thread(self.store.image_done, job.id, self.worker, position, outputs,
                                                 fidelity)
                    break
                if not kept:
                    raise JobCancelled()
            await self._finish(job)
        except JobCancelled:  # (counted where it was cancelled)
            logger.info("explanation job %s cancelled", job.id)
        finally:
            beats.cancel()
            current.clear()
            self._running = None

    async def _finish(self, job: Job) -> None:
        """A job of one image (not a batch) whose image failed fails with the image's reason; a batch succeeds with
        its failed images named in the result."""
        final = await self._in_thread(self.store.get, job.id)
        error = None
        if not final.batch and final.images and final.images[0].error is not None:
            error = final.images[0].error.message
        if await self._in_thread(self.store.finish, job.id, self.worker, error):
            metrics().jobs.labels(job.deployment, "failed" if error else "succeeded").inc()
            logger.info("explanation job %s %s", job.id, "failed" if error else "succeeded")

    @staticmethod
    def _image_error(job: Job, position: int, error: Exception) -> StoredImageError:
        """What a failed image's result says: the error `/explain` would answer, or, for a bug, that there was one."""
        if isinstance(error, ServingError):
            return StoredImageError(code=error.code, message=str(error))
        logger.error("explanation job %s: image %d failed", job.id, position, exc_info=error)
        return StoredImageError(code="internal_error", message="an unexpected error occurred; see the server log")

    async def _plan(self, instance: DeploymentInstance, job: Job, cancelled: asyncio.Event) -> list[PendingImage]:
        """The pending images, each with the labels it is explained for: a job that named none explains each image's
        prediction, chosen here for every image before the first is explained (a forward pass each, at the jobs'
        priority), so that its progress counts explanations of a known total. An image that cannot be predicted
        fails here, with the reason `/explain` would give."""
        pending = await self._in_thread(self.store.pending_images, job.id)
        unplanned = [image for image in pending if image.targets is None]
        if not unplanned:
            return pending
        inference = self.endpoint.inference
        labels = instance.deployment.require_model().bundle.labels
        chosen: dict[int, list[str]] = {}
        named = job.options.named_labels()  # (a job accepted before labels were kept per image)
        for image in unplanned:
            if cancelled.is_set():
                raise JobCancelled()
            if named:
                chosen[image.position] = image.targets = named
                continue
            data = await self._in_thread(self.store.image_bytes, job.id, image.position)
            try:
                cropped = await inference.crop(instance, EncodedImage(data, image.name))
                targets = await inference.explanation_targets(instance, cropped)
            except Exception as error:  # noqa: BLE001 - this image fails, saying why; the others go on
                if not await self._in_thread(self.store.image_failed, job.id, self.worker, image.position,
                                             self._image_error(job, image.position, error)):
                    raise JobCancelled() from None
                continue
            chosen[image.position] = image.targets = [labels[target] for target in targets]
        if not await self._in_thread(self.store.plan, job.id, self.worker, chosen):
            raise JobCancelled()
        return [image for image in pending if image.targets is not None]

    async def _explain(self, instance: DeploymentInstance, name: str, data: bytes, targets: list[str],
                       options: ExplanationOptions, token: CancelToken) -> tuple[list[Output], dict]:
        """One image's explanations of `targets` (as `/explain` makes them) and its fidelity report."""
        inference = self.endpoint.inference
        labels = instance.deployment.require_model().bundle.labels
        cropped = await inference.crop(instance, EncodedImage(data, name))
        explanation = await inference.explain(instance, cropped, options.method, options.params, token,
                                              targets=[labels.index(label) for label in targets], job=True)

        def outputs() -> list[Output]:
            return [Output(label=labels[target], visualization=explanation.visualization_png(i),
                           attributions=Output.npy(explanation.attributions[i].numpy()))
                    for i, target in enumerate(explanation.targets)]

        return await inference.in_thread(outputs), explanation.fidelity.model_dump()

    async def _beat(self, job: Job, cancelled: asyncio.Event, current: list[CancelToken]) -> None:
        """Every BEAT_S: the job is still ours; once it is not (cancelled), stop the running explanation."""
        while True:
            await asyncio.sleep(BEAT_S)
            try:
                state = await self._in_thread(self.store.beat, job.id, self.worker)
            except StateUnavailable:
                continue  # the database is down: the work goes on, its results wait for it
            if state != "running":
                cancelled.set()
                for token in current:
                    token.cancel(f"explanation job {job.id} was cancelled")
                return
