"""One generation of a deployment in a worker: the loaded model and its adaptive batcher (both shared with the worker's
other deployments of the same model), admission and probes.

An update readies a new instance beside the serving one; the swap is one assignment, and the old instance retires
once every request routed to it is answered."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from serving.config import DeploymentConfig
from serving.runtime.batching import BatchedPredictor, SharedBatchers
from serving.runtime.deployment import Deployment
from serving.runtime.errors import NotReady
from serving.runtime.limits import Admission
from serving.runtime.probes import Prober
from serving.runtime.shared_models import SharedModels

logger = logging.getLogger("lantern.serving")
RETIRE_GRACE_S = 2.0  # a request routed just before the swap holds the instance a moment later
RETIRE_MARGIN_S = 30.0  # beyond the request timeout, how long a retiring instance waits for its last requests


class DeploymentInstance:
    """A deployment generation with everything a request needs to be served by it."""

    def __init__(self, config: DeploymentConfig, generation: int, tracking_uri: str | None,
                 batchers: SharedBatchers, models: SharedModels | None = None, version: str | None = None) -> None:
        self.generation = generation
        self.deployment = Deployment(config, tracking_uri, models, version)
        settings = config.request_settings
        self.admission = Admission(f"deployment {config.name}", settings.max_concurrent_requests_per_instance,
                                   settings.max_queue_wait_ms / 1000)
        self.prober = Prober(self.deployment)
        self._batchers = batchers
        self._batching: tuple[tuple, BatchedPredictor] | None = None  # (its key, the batcher), from the first request
        self._batching_lock = threading.Lock()
        self._stopped = False
        self.requests = 0  # requests (and mirrored copies) routed here and not yet answered; the event loop counts

    @property
    def batcher(self) -> BatchedPredictor:
        """The batcher of this instance's model, shared with the deployments serving the same one (its key needs the
        loaded model: requests reach an instance once it is ready)."""
        with self._batching_lock:
            if self._batching is None:
                if self._stopped:
                    raise NotReady(f"deployment {self.name} generation {self.generation} has stopped; retry")
                self._batching = self._batchers.acquire(self, self.deployment)
            return self._batching[1]

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def config(self) -> DeploymentConfig:
        return self.deployment.config

    def start(self) -> None:
        """Load, warm up and probe in the background; the instance is routable once ready."""
        threading.Thread(target=self.prober.run, name=f"lantern-load-{self.name}-{self.generation}",
                         daemon=True).start()

    def stop(self, unload: bool = True) -> None:
        """Stop probing and batching, and let go of the model (not worth a full collection when the process ends)."""
        self.prober.stop()
        with self._batching_lock:
            self._stopped, batching, self._batching = True, self._batching, None
        if batching is not None:
            self._batchers.release(self, batching[0])
        if unload:
            self.deployment.unload()

    def discard(self) -> None:
        """Stop on a thread of its own (an instance never routed to: an update undone, replaced or removed before it
        was ready). Letting go of its model waits for the call its backend is running, such as a warm-up (seconds on
        a GPU with cuDNN's search; forever when hung), which the state thread and its heartbeat must not wait for."""
        self.prober.stop()
        threading.Thread(target=self.stop, name=f"lantern-stop-{self.name}-{self.generation}", daemon=True).start()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Hold this generation for one request, from routing until its answer is ready: it is not retired before."""
        self.requests += 1
        try:
            yield
        finally:
            self.requests -= 1

    def retire(self) -> None:
        """Stop once no request routed here is left (after a grace period; waiting at most its request timeout and
        a margin, then stopping anyway with a log line naming how many were left)."""
        def wait_then_stop() -> None:
            time.sleep(RETIRE_GRACE_S)
            bound = self.config.request_settings.request_timeout_ms / 1000 + RETIRE_MARGIN_S
            deadline = time.monotonic() + bound
            while self.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.requests:
                logger.warning("deployment %s generation %d: %d request(s) still in flight %.0f s after it was "
                               "replaced; retiring it anyway", self.name, self.generation, self.requests, bound)
            self.stop()
            logger.info("deployment %s generation %d retired", self.name, self.generation)

        threading.Thread(target=wait_then_stop, name=f"lantern-retire-{self.name}", daemon=True).start()
