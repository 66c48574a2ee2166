"""The running endpoint in one worker: its deployment instances, keys, routing (weighted split, pinning, mirror),
admission and the work behind each route. It follows the persisted endpoint state, so every worker applies a change
within a fraction of a second."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import psutil
import torch
from PIL import Image

from explain.attribute import Explanation
from explain.cpu_threads import limit_this_thread
from explain.params import ExplainError
from registry.devices import cuda_memory
from serving.runtime.abandon import Abandoned, CancelToken, running_under
from serving.control.auth import KeyCheck, bearer_token
from serving.runtime.batching import Job, Overloaded, SharedBatchers, model_error
from serving.control.checks import pinned_version
from serving.config import EndpointConfig
from serving.runtime.deployment import Prediction
from serving.http.errors import ApiError, bad_request, forbidden, not_found, not_ready, unauthorized, unprocessable
from serving.runtime.instance import DeploymentInstance
from serving.runtime.limits import Admission
from serving.runtime.metrics import metrics
from serving.runtime.shared_models import SharedModels
from serving.control.state import DeploymentRecord, EndpointState, StateStore
from serving.control.workers import HEARTBEAT_S, GpuMemory, InstanceStatus, StatusBoard, WorkerStatus

logger = logging.getLogger("lantern.serving")
PIN_HEADERS = ("x-lantern-deployment", "azureml-model-deployment")
WATCH_S = 0.2
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    """A request's images as its deployment's model sees them: each one's center crop (what explanations are drawn
    on) and the model input made from it ([3, crop, crop] float32, normalised)."""

    crops: list[Image.Image]
    pixels: list[np.ndarray]


# decodes one image of a request (raising its 4xx answer) when called with the shorter side it will be resized to
ImageSource = Callable[[int], Image.Image]


@dataclass(frozen=True)
class Route:
    """Where one request goes: the instance that answers it, and the instance that gets a mirrored copy."""

    instance: DeploymentInstance
    mirror: DeploymentInstance | None = None


class Endpoint:
    """Everything one worker process serves with."""

    def __init__(self, config: EndpointConfig, tracking_uri: str | None = None) -> None:
        self.config = config  # name, auth mode and limits; deployments and traffic come from the state
        self.tracking_uri = tracking_uri
        self.store = StateStore(config.name)
        self.board = StatusBoard(self.store.folder)
        self.worker = f"{os.getpid()}"
        self.state, restored = self.store.prepare(config, pin=lambda model: pinned_version(model, tracking_uri))
        if restored:
            logger.info("endpoint %s: state restored from %s (revision %d: %s)", config.name, self.store.path,
                        self.state.revision, self.state.last_change)
        self._stamp = self.store.stamp()
        self.instances: dict[str, DeploymentInstance] = {}
        self.next_instances: dict[str, DeploymentInstance] = {}  # new generations being readied
        self.batchers = SharedBatchers()
        self.models = SharedModels()
        self._changes = threading.Lock()
        self._process = psutil.Process()
        self._gpu_memory_failed = False  # logged once
        self._publishing = threading.Lock()  # the state thread and requests that change the state both publish
        self._stop = threading.Event()
        self._random = random.Random()
        self._mirror_tasks: set[asyncio.Task] = set()
        explain_limit = config.limits.max_concurrent_explanations
        self.explain_admission = Admission("explanations", explain_limit, 0.5)
        threads = config.limits.explanation_threads
        limit_threads = None if threads is None else partial(limit_this_thread, threads)
        self.explain_pool = ThreadPoolExecutor(explain_limit, thread_name_prefix="lantern-explain",
                                               initializer=limit_threads)
        self.work_pool = ThreadPoolExecutor(8, thread_name_prefix="lantern-decode")
        self._apply(self.state, start=False)

    # following the state -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load every deployment in the background, and follow the state file from now on."""
        for instance in self.instances.values():
            instance.start()
        self.publish()
        threading.Thread(target=self._follow, name="lantern-state", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for instance in [*self.instances.values(), *self.next_instances.values()]:
            instance.stop(unload=False)  # the worker is ending
        self.board.withdraw(self.worker)
        self.explain_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    def _new_instance(self, record: DeploymentRecord) -> DeploymentInstance:
        return DeploymentInstance(record.config, record.generation, self.tracking_uri, self.batchers, self.models,
                                  record.model_version)

    def _apply(self, state: EndpointState, start: bool = True) -> None:
        """Bring this worker's instances to `state`: new deployments load, updated ones ready a new generation beside
        the serving one, removed ones retire once their requests are answered."""
        with self._changes:
            if state.revision < self.state.revision:  # the state thread already applied a newer one
                return
            instances, upcoming = dict(self.instances), dict(self.next_instances)
            for record in state.deployments:
                name = record.config.name
                current = instances.get(name)
                if current is not None and current.generation == record.generation:
                    if name in upcoming:  # an update was undone before its instance was ready
                        upcoming.pop(name).discard()
                    continue
                pending = upcoming.get(name)
                if pending is not None and pending.generation == record.generation:
                    continue
                instance = self._new_instance(record)
                if pending is not None:
                    pending.discard()
                if current is None or not current.deployment.ready:
                    instances[name] = instance  # nothing served by the old one: replace it at once
                    upcoming.pop(name, None)
                    if current is not None:
                        current.retire()
                else:
                    upcoming[name] = instance
                if start:
                    instance.start()
            kept = set(state.names)
            self.instances = instances  # new deployments first: the state may route to them
            self.state = state
            self.scoring_keys = KeyCheck([state.keys.primary, state.keys.secondary])
            self.admin_keys = KeyCheck([state.keys.admin])
            self.instances = {n: i for n, i in instances.items() if n in kept}
            self.next_instances = {n: i for n, i in upcoming.items() if n in kept}
            for name, instance in instances.items():
                if name not in kept:
                    instance.retire()
                    logger.info("deployment %s removed", name)
            for name, instance in upcoming.items():
                if name not in kept:
                    instance.discard()

    def _promote(self) -> bool:
        """Swap in each new generation that became ready; True when something changed. Which are ready is read under
        the lock that changes them: a change applied meanwhile (by a management request) may have replaced one with a
        newer generation still loading, which must not be swapped in."""
        if not any(instance.deployment.ready for instance in self.next_instances.values()):
            return False
        with self._changes:
            instances, upcoming = dict(self.instances), dict(self.next_instances)
            ready = [name for name, instance in upcoming.items() if instance.deployment.ready]
            for name in ready:
                previous = instances.get(name)
                instances[name] = upcoming.pop(name)
                if previous is not None:
                    previous.retire()
                logger.info("deployment %s now serves generation %d", name, instances[name].generation)
            self.instances, self.next_instances = instances, upcoming
        return bool(ready)

    def _follow(self) -> None:
        last_published = time.monotonic()
        signature = self._signature()
        failing: str | None = None  # the problem last logged: logged again only when it changes, not 5 times a second
        while not self._stop.wait(WATCH_S):
            try:
                stamp = self.store.stamp()
                if stamp != self._stamp:
                    state = self.store.read()
                    self._stamp = stamp
                    if state is not None and state.revision != self.state.revision:
                        self._apply(state)
                self._promote()
                now_signature = self._signature()
                if now_signature != signature or time.monotonic() - last_published >= HEARTBEAT_S:
                    self.publish()
                    signature, last_published = now_signature, time.monotonic()
                if failing is not None:
                    logger.info("following the endpoint state works again; serving with revision %d",
                                self.state.revision)
                    failing = None
            except Exception as error:  # noqa: BLE001 - keep following (and serving the last good state)
                problem = f"{type(error).__name__}: {error}"
                if problem != failing:
                    logger.exception("following the endpoint state failed; serving goes on with revision %d until "
                                     "it works again", self.state.revision)
                    failing = problem

    def _signature(self) -> tuple:
        return (self.state.revision,
                tuple((n, i.generation, i.deployment.state) for n, i in self.instances.items()),
                tuple((n, i.generation, i.deployment.state) for n, i in self.next_instances.items()))

    def status(self) -> WorkerStatus:
        deployments = {}
        users: dict[int, list[str]] = {}  # a loaded model -> the serving deployments that share it
        for name, instance in self.instances.items():
            if instance.deployment.core is not None:
                users.setdefault(id(instance.deployment.core), []).append(name)
        for name, instance in self.instances.items():
            upcoming = self.next_instances.get(name)
            deployment = instance.deployment
            model = deployment.model
            deployments[name] = InstanceStatus(
                generation=instance.generation, state=deployment.state, reason=deployment.reason,
                model_version=deployment.model_version,
                backend=model.predictor.description if model else None,
                explain_device=str(model.explain_device) if model else None,
                shares_model_with=[other for other in users.get(id(deployment.core), []) if other != name],
                next_generation=upcoming.generation if upcoming else None,
                next_state=upcoming.deployment.state if upcoming else None,
                next_reason=upcoming.deployment.reason if upcoming else None)
        return WorkerStatus(worker=self.worker, pid=os.getpid(), revision=self.state.revision,
                            heartbeat=time.time(), memory_bytes=self._process.memory_info().rss,
                            gpu_memory=self._gpu_memory(), deployments=deployments)

    def _gpu_memory(self) -> list[GpuMemory]:
        """Each GPU a loaded deployment (serving, or its next generation) runs on, and how full it is."""
        devices = set()
        for instance in [*self.instances.values(), *self.next_instances.values()]:
            model = instance.deployment.model  # read once: an unload may clear it meanwhile
            device = model.explain_device if model is not None else None
            if device is not None and device.type == "cuda":
                devices.add(device.index if device.index is not None else torch.cuda.current_device())
        gpus = []
        try:
            for index in sorted(devices):
                used, total, torch_reserved = cuda_memory(torch.device("cuda", index))
                gpus.append(GpuMemory(device=f"cuda:{index}", used_bytes=used, total_bytes=total,
                                      torch_reserved_bytes=torch_reserved))
            return gpus
        except Exception:  # noqa: BLE001 - the status (the heartbeat) is published without it
            if not self._gpu_memory_failed:
                logger.exception("reading the GPU's memory failed; the worker's status goes on without it")
                self._gpu_memory_failed = True
            return []

    def publish(self) -> None:
        with self._publishing:  # one writer at a time (they share the temporary file), the freshest status last
            self.board.publish(self.status())

    def refresh(self) -> None:
        """Apply the persisted state now (after this worker changed it) rather than at the next poll."""
        stamp = self.store.stamp()  # before reading: a change written meanwhile then shows as a new stamp
        state = self.store.read()
        if state is not None and state.revision > self.state.revision:
            self._stamp = stamp
            self._apply(state)
            self.publish()

    # readiness, keys and routing -----------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Ready when every deployment with live traffic is ready (or, with no traffic set, every deployment)."""
        instances = self.instances
        live = list(self.state.live()) or list(instances)
        return all(name in instances and instances[name].deployment.ready for name in live)

    def authenticate(self, authorization: str | None) -> None:
        """A scoring key (unless the endpoint's auth mode is none)."""
        if self.config.auth_mode != "key":
            return
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("missing scoring key: send the header 'Authorization: Bearer <key>' "
                               "(`lantern endpoint get-credentials` prints the keys)")
        if not self.scoring_keys.accepts(token):
            raise unauthorized("the scoring key is not valid for this endpoint")

    def authenticate_admin(self, authorization: str | None) -> None:
        """The admin key, whatever the auth mode: a scoring key is refused with 403."""
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("missing admin key: send 'Authorization: Bearer <admin key>' (`lantern endpoint "
                               "get-credentials ENDPOINT --key admin` prints it; the CLI reads $LANTERN_ADMIN_KEY)")
        admin, scoring = self.admin_keys.accepts(token), self.scoring_keys.accepts(token)
        if admin:
            return
        if scoring:
            raise forbidden("a scoring key cannot change the endpoint: the management API takes the admin key")
        raise unauthorized("the admin key is not valid for this endpoint")

    def route(self, headers: dict[str, str] | Any) -> Route:
        """The pinned deployment (header; never mirrored), else a weighted pick over ready deployments with live
        traffic, plus the mirror's share."""
        instances, state = self.instances, self.state
        pins = {header: headers[header].strip() for header in PIN_HEADERS if headers.get(header, "").strip()}
        if len(set(pins.values())) > 1:
            raise bad_request("the pinning headers disagree: " + ", ".join(f"{h}: {v}" for h, v in pins.items()) +
                              "; send one of them", "conflicting_pins")
        pinned = next(iter(pins.values()), None)
        names = ", ".join(instances) or "none"
        if pinned:
            instance = instances.get(pinned)
            if instance is None:
                raise not_found(f"no deployment named {pinned!r} on endpoint {self.config.name}; deployments: {names}")
            return Route(self._check_ready(instance))
        weights = state.live()
        if not weights:
            raise not_found(f"endpoint {self.config.name} has no deployment with live traffic; set traffic, or pin "
                            f"a deployment with the header x-lantern-deployment (deployments: {names})")
        ready = [(name, percent) for name, percent in weights.items()
                 if name in instances and instances[name].deployment.ready]
        if not ready:
            name = next(iter(weights))
            if name not in instances:
                raise not_ready(f"deployment {name} is starting; retry when /readyz answers 200")
            self._check_ready(instances[name])
        chosen = self._random.choices([n for n, _ in ready], weights=[p for _, p in ready])[0]
        return Route(instances[chosen], self._mirror_pick(state, instances))

    def _mirror_pick(self, state: EndpointState, instances: dict[str, DeploymentInstance]) -> DeploymentInstance | None:
        for name, percent in state.mirror_traffic.items():
            if percent > 0 and self._random.random() * 100 < percent:
                instance = instances.get(name)
                if instance is None or not instance.deployment.ready:
                    metrics().mirrored.labels(name, "", "skipped_unready").inc()
                    return None
                return instance
        return None

    @staticmethod
    def _check_ready(instance: DeploymentInstance) -> DeploymentInstance:
        deployment = instance.deployment
        if deployment.state == "failed":
            raise not_ready(f"deployment {deployment.name} failed to load: {deployment.reason}")
        if not deployment.ready:
            why = f" ({deployment.reason})" if deployment.reason else ""
            raise not_ready(f"deployment {deployment.name} is {deployment.state}{why}; retry when /readyz answers 200")
        return instance

    # the work ------------------------------------------------------------------------------------------------------
    async def in_thread(self, func: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool or self.work_pool, func, *args)

    async def prepare(self, instance: DeploymentInstance, sources: Sequence[ImageSource]) -> Prepared:
        """A request's images decoded, cropped and normalised for `instance`'s model in one trip to the work pool.
        One image at a time: only its crop is kept, so a request of 64 images of 40 M pixels holds one decoded image
        (120 MB), not all 64."""
        preprocess = instance.deployment.require_model().preprocess

        def run() -> Prepared:
            crops, pixels = [], []
            for source in sources:
                crop = preprocess.crop(source(preprocess.resize_size))
                crops.append(crop)
                pixels.append(preprocess.normalize(crop).numpy())
            return Prepared(crops, pixels)

        started = time.perf_counter()
        prepared = await self.in_thread(run)
        metrics().preprocess_seconds.labels(instance.deployment.name).observe(time.perf_counter() - started)
        return prepared

    async def predict(self, instance: DeploymentInstance, prepared: Prepared,
                      threshold: list[float | None] | None = None) -> list[Prediction]:
        """Predictions for prepared images, each batched adaptively with other requests' images."""
        deployment = instance.deployment
        pixels = prepared.pixels
        try:
            predictor = deployment.require_model().predictor
            logits = await asyncio.gather(*(instance.batcher.logits(Job(p, deployment.name, predictor))
                                            for p in pixels))
        except Overloaded:
            raise ApiError(503, "overloaded", f"deployment {deployment.name} could not batch this request within its "
                                              f"max_latency_ms ({deployment.config.max_latency_ms} ms)") from None
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 - the model failed on this input
            raise model_error(deployment, error) from None
        metrics().images.labels(deployment.name).inc(len(pixels))
        thresholds = threshold or [None] * len(pixels)
        return [deployment.postprocess(row[None], t)[0] for row, t in zip(logits, thresholds)]

    def mirror(self, target: DeploymentInstance | None, sources: Sequence[ImageSource], route: str) -> None:
        """Send a copy of a request's images to the mirrored deployment in the background; its answer is only
        counted (lantern_mirrored_requests_total), never returned, and the caller never waits for it. The copy
        decodes the images again (the mirrored version may preprocess them differently)."""
        if target is None:
            return
        task = asyncio.get_running_loop().create_task(self._mirrored(target, list(sources), route))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _mirrored(self, target: DeploymentInstance, sources: list[ImageSource], route: str) -> None:
        start, outcome = time.perf_counter(), "failed"
        timeout = target.config.request_settings.request_timeout_ms / 1000

        async def copy() -> None:  # its own preprocessing: the mirrored version may have other settings
            await self.predict(target, await self.prepare(target, sources))

        try:
            with target.serving():
                async with target.admission.enter():
                    await asyncio.wait_for(copy(), timeout)
            outcome = "completed"
        except ApiError as error:
            outcome = "dropped" if error.status in (429, 503) else "failed"
        except TimeoutError:
            outcome = "timeout"
        except Exception:  # noqa: BLE001 - a mirrored copy never affects anything but its own count
            logger.exception("mirrored copy to %s failed", target.name)
        finally:
            metrics().mirrored.labels(target.name, route, outcome).inc()
            metrics().mirror_latency.labels(target.name, route).observe(time.perf_counter() - start)

    async def explain(self, instance: DeploymentInstance, cropped: Image.Image, method: str, params: dict[str, Any],
                      token: CancelToken, targets: list[int] | None = None,
                      threshold: float | None = None) -> Explanation:
        """One explanation, computed in the explanation pool under `token` (abandoned when the token is cancelled)."""
        deployment = instance.deployment

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
            explanation = await self.in_thread(run, pool=self.explain_pool)
        except Abandoned:
            raise asyncio.CancelledError() from None
        except ExplainError as error:
            raise unprocessable(str(error), "invalid_explanation") from None
        except Exception as error:  # noqa: BLE001 - the model failed while being explained
            logger.exception("explanation failed on deployment %s", deployment.name)
            raise model_error(deployment, error) from None
        metrics().explanation_seconds.labels(deployment.name, method).observe(time.perf_counter() - start)
        return explanation


def endpoint_of(request: Any) -> Endpoint:
    """The worker's endpoint, kept on the ASGI app's state by the BentoML service."""
    endpoint = getattr(request.app.state, "endpoint", None)
    if endpoint is None:
        raise ApiError(503, "not_ready", "the endpoint is starting")
    return endpoint
