"""The running endpoint in one worker: its deployment instances by name, following the persisted endpoint state (so
every worker applies a change within a fraction of a second), readying updated deployments beside the serving ones
and swapping them in once ready; routing (routing.py) and the work (inference.py) run over its instances."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Mapping

from serving.config import EndpointConfig
from serving.control.auth import KeyCheck
from serving.control.checks import pinned_version
from serving.control.control import ServedModel
from serving.control.database import embedded
from serving.control.job_files import JobFiles
from serving.control.jobs import JobStore
from serving.control.state import DeploymentRecord, EndpointState, StateStore
from serving.control.workers import HEARTBEAT_S, StatusBoard, WorkerStatus, host_id
from serving.runtime.batching import SharedBatchers
from serving.runtime.explain_jobs import JobRunner
from serving.runtime.inference import Inference
from serving.runtime.instance import DeploymentInstance
from serving.runtime.routing import Route, pick_route
from serving.runtime.shared_models import SharedModels
from serving.runtime.worker_status import StatusReporter

logger = logging.getLogger("lantern.serving")
WATCH_S = 0.2


class Endpoint:
    """Everything one worker process serves with."""

    def __init__(self, config: EndpointConfig, tracking_uri: str | None = None, state_uri: str | None = None) -> None:
        self.config = config  # name, auth mode and limits; deployments and traffic come from the state
        self.tracking_uri = tracking_uri
        self.store = StateStore(config.name, state_uri)
        self.board = StatusBoard(self.store.engine, config.name)
        self.host = host_id()
        self.worker = f"{self.host}/{os.getpid()}"
        self.state, restored = self.store.prepare(config, pin=lambda model: pinned_version(model, tracking_uri))
        if restored:
            logger.info("endpoint %s: state restored from %s (revision %d: %s)", config.name, self.store.where,
                        self.state.revision, self.state.last_change)
        self._stamp = self.store.stamp()
        self.state_problem: str | None = None  # why following the state fails now (the database down): shown in views
        self.instances: dict[str, DeploymentInstance] = {}
        self.next_instances: dict[str, DeploymentInstance] = {}  # new generations being readied
        self.batchers = SharedBatchers()
        self.models = SharedModels()
        self._changes = threading.Lock()
        self.reporter = StatusReporter(self.worker, self.host, publishes_counters=not embedded(self.store.uri))
        self._publishing = threading.Lock()  # the state thread and requests that change the state both publish
        self._stop = threading.Event()
        self._random = random.Random()
        self.inference = Inference(config.limits)
        self.jobs = JobStore(config.name, self.store.uri, JobFiles(config.name, tracking_uri),
                             config.limits.job_inline_result_bytes)
        self.job_runner = JobRunner(self, self.jobs)
        self._apply(self.state, start=False)

    # following the state -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load every deployment in the background, and follow the state file from now on."""
        for instance in self.instances.values():
            instance.start()
        self.publish()
        threading.Thread(target=self._follow, name="lantern-state", daemon=True).start()

    def start_jobs(self) -> None:
        """Run the endpoint's explanation jobs in this worker (on its event loop) from now on."""
        self.job_runner.start()

    def stop(self) -> None:
        self._stop.set()
        self.job_runner.stop()
        for instance in [*self.instances.values(), *self.next_instances.values()]:
            instance.stop(unload=False)  # the worker is ending
        self.board.withdraw(self.worker)
        self.inference.stop()

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
                    failing = self.state_problem = None
            except Exception as error:  # noqa: BLE001 - keep following (and serving the last good state)
                problem = f"{type(error).__name__}: {error}"
                self.state_problem = str(error)
                if problem != failing:
                    logger.exception("following the endpoint state failed; serving goes on with revision %d until "
                                     "it works again", self.state.revision)
                    failing = problem

    def _signature(self) -> tuple:
        return (self.state.revision,
                tuple((n, i.generation, i.deployment.state) for n, i in self.instances.items()),
                tuple((n, i.generation, i.deployment.state) for n, i in self.next_instances.items()))

    def status(self) -> WorkerStatus:
        """This worker's status now, as the status board shows it."""
        return self.reporter.status(self.state.revision, self.instances, self.next_instances)

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

    # readiness and routing -----------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Ready when every deployment with live traffic is ready (or, with no traffic set, every deployment)."""
        instances = self.instances
        live = list(self.state.live()) or list(instances)
        return all(name in instances and instances[name].deployment.ready for name in live)

    def route(self, headers: Mapping[str, str]) -> Route:
        """Where a request with `headers` goes now (routing.py)."""
        return pick_route(self.config.name, self.instances, self.state, headers, self._random)

    def served_model(self, name: str, generation: int) -> ServedModel | None:
        """The settings and labels `name`'s `generation` serves in this worker, once loaded there."""
        instance = self.instances.get(name)
        model = instance.deployment.model if instance and instance.generation == generation else None
        if model is None:
            return None
        return ServedModel(settings=model.settings.model_dump(mode="json"), labels=list(model.bundle.labels))
