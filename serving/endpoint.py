"""The running endpoint: its deployments, scoring keys, routing, admission and the work behind each route."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from bentoml._internal.marshal.dispatcher import NonBlockSema
from PIL import Image

from explain.attribute import Explanation
from explain.params import ExplainError
from serving.abandon import Abandoned, CancelToken, running_under
from serving.auth import KeyCheck, bearer_token, scoring_keys
from serving.batching import BatchedPredictor, Job, Overloaded, model_error
from serving.config import EndpointConfig
from serving.deployment import Deployment, Prediction
from serving.errors import ApiError, not_found, not_ready, unauthorized, unprocessable
from serving.limits import Admission
from serving.metrics import metrics
from serving.probes import Prober

logger = logging.getLogger("lantern.serving")
PIN_HEADERS = ("x-lantern-deployment", "azureml-model-deployment")
T = TypeVar("T")


class Endpoint:
    """Everything one worker process serves with; built once per worker from the endpoint configuration."""

    def __init__(self, config: EndpointConfig, tracking_uri: str | None = None) -> None:
        self.config = config
        self.deployments = {d.name: Deployment(d, tracking_uri) for d in config.deployments}
        self.keys = KeyCheck(scoring_keys(config.name)) if config.auth_mode == "key" else None
        self.admissions = {
            d.name: Admission(f"deployment {d.name}", d.request_settings.max_concurrent_requests_per_instance,
                              d.request_settings.max_queue_wait_ms / 1000)
            for d in config.deployments
        }
        explain_limit = config.limits.max_concurrent_explanations
        self.explain_admission = Admission("explanations", explain_limit, 0.5)
        self.explain_pool = ThreadPoolExecutor(explain_limit, thread_name_prefix="lantern-explain")
        self.work_pool = ThreadPoolExecutor(8, thread_name_prefix="lantern-decode")
        semaphores: dict[str, NonBlockSema] = {}
        self.batchers = {
            d.name: BatchedPredictor(self.deployments[d.name], semaphores.setdefault(d.device, NonBlockSema(1)))
            for d in config.deployments
        }
        self.probers = [Prober(self.deployments[d.name]) for d in config.deployments]
        self._random = random.Random()

    def start(self) -> None:
        """Load every deployment in the background; each becomes routable when loaded, warmed up and probed."""
        for prober in self.probers:
            threading.Thread(target=prober.run, name=f"lantern-load-{prober.deployment.name}", daemon=True).start()

    def stop(self) -> None:
        for prober in self.probers:
            prober.stop()
        for batcher in self.batchers.values():
            batcher.shutdown()
        self.explain_pool.shutdown(wait=False, cancel_futures=True)
        self.work_pool.shutdown(wait=False, cancel_futures=True)

    # readiness and routing
    def is_ready(self) -> bool:
        """Ready when every deployment with live traffic is ready (or, with no traffic set, every deployment)."""
        live = [name for name, percent in self.config.traffic.items() if percent > 0] or list(self.deployments)
        return all(self.deployments[name].ready for name in live)

    def authenticate(self, authorization: str | None) -> None:
        if self.keys is None:
            return
        token = bearer_token(authorization)
        if token is None:
            raise unauthorized("missing scoring key: send the header 'Authorization: Bearer <key>' "
                               "(`lantern endpoint get-credentials` prints the keys)")
        if not self.keys.accepts(token):
            raise unauthorized("the scoring key is not valid for this endpoint")

    def route(self, headers: dict[str, str] | Any) -> Deployment:
        """The pinned deployment (header), else a weighted pick over ready deployments with live traffic."""
        pinned = next((headers.get(h) for h in PIN_HEADERS if headers.get(h)), None)
        names = ", ".join(self.deployments) or "none"
        if pinned:
            deployment = self.deployments.get(pinned.strip())
            if deployment is None:
                raise not_found(f"no deployment named {pinned!r} on endpoint {self.config.name}; deployments: {names}")
            return self._check_ready(deployment)
        weights = [(name, percent) for name, percent in self.config.traffic.items() if percent > 0]
        if not weights:
            raise not_found(f"endpoint {self.config.name} has no deployment with live traffic; set traffic, or pin "
                            f"a deployment with the header x-lantern-deployment (deployments: {names})")
        ready = [(name, percent) for name, percent in weights if self.deployments[name].ready]
        if not ready:
            name = weights[0][0]
            return self._check_ready(self.deployments[name])
        chosen = self._random.choices([n for n, _ in ready], weights=[p for _, p in ready])[0]
        return self.deployments[chosen]

    @staticmethod
    def _check_ready(deployment: Deployment) -> Deployment:
        if deployment.state == "failed":
            raise not_ready(f"deployment {deployment.name} failed to load: {deployment.reason}")
        if not deployment.ready:
            raise not_ready(f"deployment {deployment.name} is {deployment.state}; retry when /readyz answers 200")
        return deployment

    # the work
    async def in_thread(self, func: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool or self.work_pool, func, *args)

    async def predict(self, deployment: Deployment, images: list[Image.Image],
                      threshold: list[float | None] | None = None) -> list[Prediction]:
        """Predictions for decoded images, each batched adaptively with other requests' images."""
        model = deployment.require_model()
        pixels = await self.in_thread(lambda: [model.preprocess(image).numpy() for image in images])
        batcher = self.batchers[deployment.name]
        try:
            logits = await asyncio.gather(*(batcher.logits(Job(p)) for p in pixels))
        except Overloaded:
            raise ApiError(503, "overloaded", f"deployment {deployment.name} could not batch this request within its "
                                              f"max_latency_ms ({deployment.config.max_latency_ms} ms)") from None
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 - the model failed on this input
            raise model_error(deployment, error) from None
        metrics().images.labels(deployment.name).inc(len(images))
        thresholds = threshold or [None] * len(images)
        return [deployment.postprocess(row[None], t)[0] for row, t in zip(logits, thresholds)]

    async def explain(self, deployment: Deployment, cropped: Image.Image, method: str, params: dict[str, Any],
                      token: CancelToken, targets: list[int] | None = None,
                      threshold: float | None = None) -> Explanation:
        """One explanation, computed in the explanation pool under `token` (abandoned when the token is cancelled)."""

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
