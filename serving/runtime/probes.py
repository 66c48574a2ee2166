"""Loading a deployment, then its readiness and liveness probes (SPEC.md section 2 semantics, in seconds).

Readiness: the deployment takes traffic only after `initial_delay` and `success_threshold` passing probes;
`failure_threshold` failures in a row mark it unready until it passes again. Liveness: `failure_threshold` failures in a
row reload the deployment. A probe runs the backend on one blank image within `timeout`; a probe that waited that
long behind the batches of live traffic (the backend runs one call at a time, on its own thread) passes when the
backend answered one of those calls meanwhile: busy is not stuck."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from serving.config import Probe
from serving.runtime.deployment import Deployment
from serving.runtime.metrics import metrics

logger = logging.getLogger("lantern.serving")


class Prober:
    """Runs in its own thread: loads the deployment, then probes it until stopped."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def probe_once(self, probe: Probe) -> bool:
        model = self.deployment.model
        if model is None:
            return False
        started = time.monotonic()
        try:
            # straight to the backend's thread: a probe of a stuck model must not hold a thread that the probes of the
            # model reloaded after it need
            future = model.predictor.submit([model.probe_image()])
            return model.finite(future.result(timeout=probe.timeout))
        except FutureTimeout:  # (raised by `result`: the future exists)
            future.cancel()  # still queued behind a long or stuck call: not run for nothing later
            return model.predictor.thread.last_answer > started
        except Exception:  # noqa: BLE001 - a failing probe is the information itself
            if not self._stop.is_set():  # else the instance stopped under the probe: its backend's thread is closed
                logger.exception("probe of deployment %s failed", self.deployment.name)
            return False

    def run(self) -> None:
        deployment = self.deployment
        readiness, liveness = deployment.config.readiness_probe, deployment.config.liveness_probe
        started = time.monotonic()
        if not deployment.load():
            return
        if self._stop.wait(max(0.0, readiness.initial_delay - (time.monotonic() - started))):
            return
        passes = fails = live_fails = 0
        next_liveness = started + liveness.initial_delay
        while not self._stop.is_set():
            passed = self.probe_once(readiness)
            if self._stop.is_set():  # stopped during the probe: its result says nothing about the model
                return
            if passed:
                passes, fails = passes + 1, 0
                if deployment.state != "ready" and passes >= readiness.success_threshold:
                    deployment.state, deployment.reason = "ready", None
                    logger.info("deployment %s is ready", deployment.name)
            else:
                passes, fails = 0, fails + 1
                if deployment.state == "ready" and fails >= readiness.failure_threshold:
                    deployment.state, deployment.reason = "unready", f"readiness probe failed {fails} times in a row"
            if time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + liveness.period
                live_fails = 0 if self.probe_once(liveness) else live_fails + 1
                if self._stop.is_set():  # a stopped deployment is never reloaded
                    return
                if live_fails >= liveness.failure_threshold:
                    logger.error("deployment %s failed its liveness probe %d times; reloading", deployment.name,
                                 live_fails)
                    metrics().reloads.labels(deployment.name).inc()
                    deployment.state = "loading"
                    deployment.reason = f"reloaded after {live_fails} failed liveness probes in a row"
                    if not deployment.load(fresh=True):  # not the same (stuck) model another deployment shares
                        return
                    passes = fails = live_fails = 0
            self._stop.wait(readiness.period if deployment.state == "ready" else min(readiness.period, 1.0))
