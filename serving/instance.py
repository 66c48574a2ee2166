"""One generation of a deployment in a worker: the loaded model, its adaptive batcher, admission and probes.

An update readies a new instance beside the serving one; the swap is one assignment, and the old instance retires
once the requests it admitted are answered."""

from __future__ import annotations

import logging
import threading
import time

from serving.batching import BatchedPredictor, DeviceSemaphore
from serving.config import DeploymentConfig
from serving.deployment import Deployment
from serving.limits import Admission
from serving.probes import Prober

logger = logging.getLogger("lantern.serving")
RETIRE_GRACE_S = 2.0  # a request routed just before the change may not be admitted yet


class DeploymentInstance:
    """A deployment generation with everything a request needs to be served by it."""

    def __init__(self, config: DeploymentConfig, generation: int, tracking_uri: str | None,
                 semaphore: DeviceSemaphore) -> None:
        self.generation = generation
        self.deployment = Deployment(config, tracking_uri)
        settings = config.request_settings
        self.admission = Admission(f"deployment {config.name}", settings.max_concurrent_requests_per_instance,
                                   settings.max_queue_wait_ms / 1000)
        self.batcher = BatchedPredictor(self.deployment, semaphore)
        self.prober = Prober(self.deployment)

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
        self.batcher.shutdown()
        if unload:
            self.deployment.unload()

    def retire(self) -> None:
        """Stop after a grace period, once no admitted request is left (waiting at most its request timeout)."""
        def wait_then_stop() -> None:
            time.sleep(RETIRE_GRACE_S)
            deadline = time.monotonic() + self.config.request_settings.request_timeout_ms / 1000
            while self.admission.in_flight and time.monotonic() < deadline:
                time.sleep(0.1)
            self.stop()
            logger.info("deployment %s generation %d retired", self.name, self.generation)

        threading.Thread(target=wait_then_stop, name=f"lantern-retire-{self.name}", daemon=True).start()
