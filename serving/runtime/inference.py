"""The work behind each route, in one worker: a request's images decoded and prepared for its deployment's model,
predictions batched adaptively, mirrored copies sent in the background, explanations in their own pool. The pools
and the explanation admission live here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from explain.attribute import Explanation
from explain.cpu_threads import limit_this_thread, lower_this_thread_priority
from explain.params import ExplainError
from registry.detection_answers import DetectionAnswer, detection_answer
from registry.detection_inference import decode_side, merge_parts, tile_inputs
from serving.config import Limits
from serving.runtime.abandon import Abandoned, CancelToken, running_under
from serving.runtime.batching import Job
from serving.runtime.deployment import Deployment, Prediction
from serving.runtime.errors import (
    InvalidExplanation,
    NotExplainable,
    Overloaded,
    ServingError,
    Unavailable,
    model_failure,
)
from serving.runtime.images import EncodedImage
from serving.runtime.instance import DeploymentInstance
from serving.runtime.limits import Admission
from serving.runtime.metrics import metrics

logger = logging.getLogger("lantern.serving")
T = TypeVar("T")
WORK_THREADS = 8  # decoding, parsing large bodies, encoding answers


@dataclass(frozen=True)
class Prepared:
    """A request's images as its deployment's model sees them: for a classifier each one's center crop (what
    explanations are drawn on) and the model input made from it ([3, crop, crop] float32, normalised); for a
    detector no crops, and each whole image ([3, H, W] uint8: the detector resizes it)."""

    crops: list[Image.Image]
    pixels: list[np.ndarray]


def not_explainable(deployment: Deployment) -> NotExplainable:
    model = deployment.require_model()
    return NotExplainable(f"explanations are for classification models; deployment {deployment.name} serves "
                          f"{model.bundle.uri}, an {model.bundle.spec.task} model")


def start_job_thread(threads: int, niceness: int) -> None:
    """A job pool thread: `threads` OpenMP threads, at CPU priority `niceness` (the cores go to live work first)."""
    lower_this_thread_priority(niceness)  # first: the OpenMP team this thread starts later inherits it
    limit_this_thread(threads)


class Inference:
    """Prediction, mirroring and explanation for one worker, with the thread pools they run in."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        explain_limit = limits.max_concurrent_explanations
        self.explain_admission = Admission("explanations", explain_limit, 0.5)
        threads = limits.explanation_threads
        limit_threads = None if threads is None else partial(limit_this_thread, threads)
        self.explain_pool = ThreadPoolExecutor(explain_limit, thread_name_prefix="lantern-explain",
                                               initializer=limit_threads)
        # explanation jobs compute at the lowest CPU priority: every core while the worker is idle, what live
        # predictions and explanations leave them otherwise (the scheduler's weights, not a share of the cores)
        job_threads = limits.job_explanation_threads or threads or torch.get_num_threads()
        self.job_pool = ThreadPoolExecutor(explain_limit, thread_name_prefix="lantern-job",
                                           initializer=partial(start_job_thread, job_threads, limits.job_cpu_niceness))
        self.work_pool = ThreadPoolExecutor(WORK_THREADS, thread_name_prefix="lantern-decode")
        self._mirror_tasks: set[asyncio.Task] = set()

    def stop(self) -> None:
        self.explain_pool.shutdown(wait=False, cancel_futures=True)
        self.job_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    async def in_thread(self, func: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool or self.work_pool, func, *args)

    async def prepare(self, instance: DeploymentInstance, images: Sequence[EncodedImage]) -> Prepared:
        """A request's images decoded, cropped and normalised for `instance`'s model in one trip to the work pool.
        One image at a time: only its crop is kept, so a request of 64 images of 40 M pixels holds one decoded image
        (120 MB), not all 64."""
        model = instance.deployment.require_model()
        preprocess = model.preprocess
        max_pixels = self.limits.max_image_pixels

        def run() -> Prepared:
            if preprocess is None:  # a detector
                side = decode_side(model.settings)
                return Prepared([], [pil_to_tensor(image.decode(max_pixels, side)).numpy() for image in images])
            crops, pixels = [], []
            for image in images:
                crop = preprocess.crop(image.decode(max_pixels, preprocess.resize_size))
                crops.append(crop)
                pixels.append(preprocess.normalize(crop).numpy())
            return Prepared(crops, pixels)

        started = time.perf_counter()
        prepared = await self.in_thread(run)
        metrics().preprocess_seconds.labels(instance.deployment.name).observe(time.perf_counter() - started)
        return prepared

    async def crop(self, instance: DeploymentInstance, image: EncodedImage) -> Image.Image:
        """One image decoded and center-cropped as `instance`'s model sees it (what an explanation is drawn on)."""
        preprocess = instance.deployment.require_model().preprocess
        if preprocess is None:
            raise not_explainable(instance.deployment)
        max_pixels = self.limits.max_image_pixels
        return await self.in_thread(lambda: preprocess.crop(image.decode(max_pixels, preprocess.resize_size)))

    async def _batched(self, instance: DeploymentInstance, rows: list[np.ndarray]) -> list[Any]:
        """The backend's answer for each row, each batched adaptively with other requests' rows."""
        deployment = instance.deployment
        try:
            predictor = deployment.require_model().predictor
            return await asyncio.gather(*(instance.batcher.logits(Job(row, deployment.name, predictor))
                                          for row in rows))
        except Overloaded:
            raise Overloaded(f"deployment {deployment.name} could not batch this request within its max_latency_ms "
                             f"({deployment.config.max_latency_ms} ms)") from None
        except ServingError:
            raise
        except Exception as error:  # noqa: BLE001 - the model failed on this input
            raise model_failure(deployment.name, error) from None

    async def predict(self, instance: DeploymentInstance, prepared: Prepared,
                      threshold: list[float | None] | None = None) -> list[Prediction]:
        """A classifier's predictions for prepared images, each batched adaptively with other requests' images."""
        deployment = instance.deployment
        pixels = prepared.pixels
        logits = await self._batched(instance, pixels)
        metrics().images.labels(deployment.name).inc(len(pixels))
        thresholds = threshold or [None] * len(pixels)
        return [deployment.postprocess(row[None], t)[0] for row, t in zip(logits, thresholds)]

    async def detect(self, instance: DeploymentInstance, prepared: Prepared) -> list[DetectionAnswer]:
        """A detector's answers for prepared images: each image (and each of its tiles, when the settings tile it)
        batched adaptively with other requests' images; tiles merged, answers made (polygons traced) in the work
        pool."""
        deployment = instance.deployment
        model = deployment.require_model()
        settings, labels = model.settings, model.bundle.labels
        parts = [tile_inputs(torch.from_numpy(pixels), settings) for pixels in prepared.pixels]
        found = await self._batched(instance, [np.ascontiguousarray(part.numpy())
                                               for image_parts in parts for part, _, _ in image_parts])
        metrics().images.labels(deployment.name).inc(len(prepared.pixels))

        def answers() -> list[DetectionAnswer]:
            out, start = [], 0
            for pixels, image_parts in zip(prepared.pixels, parts):
                placed = [(found[start + i], x0, y0) for i, (_, x0, y0) in enumerate(image_parts)]
                start += len(image_parts)
                height, width = pixels.shape[1:]
                out.append(detection_answer(merge_parts(placed, settings, width, height), labels, width, height,
                                            settings))
            return out

        return await self.in_thread(answers)

    async def answer(self, instance: DeploymentInstance, prepared: Prepared) -> list[Prediction] | list[DetectionAnswer]:
        """What `instance`'s model answers for prepared images: predictions, or detections."""
        if instance.deployment.require_model().detects:
            return await self.detect(instance, prepared)
        return await self.predict(instance, prepared)

    def mirror(self, target: DeploymentInstance | None, images: Sequence[EncodedImage], route: str) -> None:
        """Send a copy of a request's images to the mirrored deployment in the background; its answer is only
        counted (lantern_mirrored_requests_total), never returned, and the caller never waits for it. The copy
        decodes the images again (the mirrored version may preprocess them differently)."""
        if target is None:
            return
        task = asyncio.get_running_loop().create_task(self._mirrored(target, list(images), route))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _mirrored(self, target: DeploymentInstance, images: list[EncodedImage], route: str) -> None:
        start, outcome = time.perf_counter(), "failed"
        timeout = target.config.request_settings.request_timeout_ms / 1000

        async def copy() -> None:  # its own preprocessing: the mirrored version may have other settings
            await self.answer(target, await self.prepare(target, images))

        try:
            with target.serving():
                async with target.admission.enter():
                    await asyncio.wait_for(copy(), timeout)
            outcome = "completed"
        except Unavailable:  # busy, not ready, overloaded, out of memory: the copy was dropped
            outcome = "dropped"
        except ServingError:
            outcome = "failed"
        except TimeoutError:
            outcome = "timeout"
        except Exception:  # noqa: BLE001 - a mirrored copy never affects anything but its own count
            logger.exception("mirrored copy to %s failed", target.name)
        finally:
            metrics().mirrored.labels(target.name, route, outcome).inc()
            metrics().mirror_latency.labels(target.name, route).observe(time.perf_counter() - start)

    async def explanation_targets(self, instance: DeploymentInstance, cropped: Image.Image) -> list[int]:
        """The labels an explanation of `cropped` explains by default (its prediction), for an explanation job that
        plans its work: computed in the jobs' pool, at the lowest CPU priority."""
        deployment = instance.deployment
        if deployment.require_model().detects:
            raise not_explainable(deployment)
        return await self.in_thread(deployment.explanation_targets, cropped, pool=self.job_pool)

    async def explain(self, instance: DeploymentInstance, cropped: Image.Image, method: str, params: dict[str, Any],
                      token: CancelToken, targets: list[int] | None = None,
                      threshold: float | None = None, job: bool = False) -> Explanation:
        """One explanation, computed in the explanation pool under `token` (abandoned when the token is cancelled);
        an explanation job's in the jobs' pool, at the lowest CPU priority."""
        deployment = instance.deployment
        if deployment.require_model().detects:
            raise not_explainable(deployment)

        def run() -> Explanation:
            outcome = "failed"
            try:
                with running_under(token):
                    explanation = deployment.explain(cropped, method, params, targets, threshold)
                outcome = "completed"
                return explanation
            except Abandoned:
                outcome = "abandoned"
                raise
            finally:
                metrics().explanation_runs.labels(deployment.name, method, outcome).inc()

        start = time.perf_counter()
        try:
            explanation = await self.in_thread(run, pool=self.job_pool if job else self.explain_pool)
        except Abandoned:
            raise asyncio.CancelledError() from None
        except ExplainError as error:
            raise InvalidExplanation(str(error)) from None
        except ServingError:
            raise
        except Exception as error:  # noqa: BLE001 - the model failed while being explained
            logger.exception("explanation failed on deployment %s", deployment.name)
            raise model_failure(deployment.name, error) from None
        metrics().explanation_seconds.labels(deployment.name, method).observe(time.perf_counter() - start)
        return explanation
