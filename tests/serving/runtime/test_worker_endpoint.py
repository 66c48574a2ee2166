"""A worker's endpoint in-process (serving/runtime/endpoint.py): following the state while deployments load and stop."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest

from serving.config import DeploymentConfig, EndpointConfig, Probe
from serving.control.state import DeploymentRecord, EndpointState
from serving.control.workers import WorkerStatus
from serving.runtime.deployment import Deployment
from serving.runtime.endpoint import Endpoint
from support.common import LABELS, SMALL_SETTINGS

QUICK_PROBE = Probe(initial_delay=0, period=0.05)


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def published(endpoint: Endpoint) -> WorkerStatus:
    """This worker's status as the management API reads it."""
    return next(status for status in endpoint.board.live() if status.worker == endpoint.worker)


def test_a_pending_instance_stuck_in_its_warm_up_does_not_hold_up_the_worker(store: str, checkpoints: dict[str, Path],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An update replaced before its instance was ready stops that instance, and letting go of its model waits for the
    call its backend is running. Here that call is a warm-up stuck behind a hung one (a GPU's first call can take
    seconds; a hung kernel, forever). Before, the stop ran where the state is applied, so the next generation did not
    even start, and the worker's state thread (its heartbeat, its promotions) stood still as long as the call did."""
    from registry.register import register_checkpoint

    for _ in range(2):
        register_checkpoint("rolled", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    hung, reached, backends = threading.Event(), threading.Event(), []
    warm_up = Deployment._warm_up

    def stuck_for_version_2(deployment: Deployment, model) -> None:
        if deployment.config.model == "models:/rolled/2":
            backends.append(model.predictor.thread.run(threading.current_thread))
            model.predictor.thread.submit(hung.wait)  # the backend's thread busy, as a hung kernel keeps it
            reached.set()
        warm_up(deployment, model)

    monkeypatch.setattr(Deployment, "_warm_up", stuck_for_version_2)
    blue = DeploymentConfig(name="blue", model="models:/rolled/1", device="cpu", readiness_probe=QUICK_PROBE)
    endpoint = Endpoint(EndpointConfig(name="rolling", auth_mode="none", deployments=[blue], traffic={"blue": 100}),
                        tracking_uri=store)

    def updated(model: str, generation: int):
        def mutate(state: EndpointState) -> EndpointState:
            config = blue.model_copy(update={"model": model})
            return state.model_copy(update={"deployments": [DeploymentRecord(config=config, generation=generation)]})
        return mutate

    try:
        endpoint.start()
        assert wait_for(lambda: endpoint.instances["blue"].deployment.ready), endpoint.status()
        endpoint.store.change(updated("models:/rolled/2", 2), "update blue to version 2")
        assert reached.wait(60)
        endpoint.store.change(updated("models:/rolled/1", 3), "update blue back to version 1")
        assert wait_for(lambda: endpoint.instances["blue"].generation == 3), endpoint.status()
        assert "blue" not in endpoint.next_instances
        assert wait_for(lambda: published(endpoint).deployments["blue"].generation == 3)
        heartbeat = published(endpoint).heartbeat
        assert wait_for(lambda: published(endpoint).heartbeat > heartbeat)  # the heartbeat goes on
        assert backends[0].is_alive()  # still in the hung call
        hung.set()  # the call ends: the stopped instance's model is let go, its backend's thread ends
        assert wait_for(lambda: not backends[0].is_alive())
    finally:
        hung.set()
        endpoint.stop()
        gc.unfreeze()


def test_a_generation_replaced_while_promotions_are_checked_is_not_swapped_in(store: str,
                                                                              checkpoints: dict[str, Path]) -> None:
    """The state thread swaps in each next generation that is ready. A change applied meanwhile by a management
    request can replace a ready generation with a newer one, still loading; before, which names were ready was read
    before taking the lock that changes them, so the newer, unready generation was swapped in (and the one serving
    retired). Here the change is applied right after the ready generation's state is read."""
    from registry.register import register_checkpoint

    for _ in range(2):
        register_checkpoint("swapped", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    blue = DeploymentConfig(name="blue", model="models:/swapped/1", device="cpu", readiness_probe=QUICK_PROBE)
    endpoint = Endpoint(EndpointConfig(name="swapping", auth_mode="none", deployments=[blue], traffic={"blue": 100}),
                        tracking_uri=store)

    def update(model: str, generation: int) -> EndpointState:
        config = blue.model_copy(update={"model": model})
        return endpoint.store.change(lambda state: state.model_copy(update={"deployments": [
            DeploymentRecord(config=config, generation=generation)]}), f"blue to {model}")

    try:
        for instance in endpoint.instances.values():  # as `start` does, without the state thread: promotions are ours
            instance.start()
        assert wait_for(lambda: endpoint.instances["blue"].deployment.ready), endpoint.status()
        endpoint._apply(update("models:/swapped/2", 2))
        ready_next = endpoint.next_instances["blue"]
        assert wait_for(lambda: ready_next.deployment.ready), endpoint.status()
        newer = update("models:/swapped/1", 3)
        applied = []

        class ReplacedOnRead(Deployment):
            @property
            def ready(self) -> bool:
                ready = Deployment.ready.fget(self)
                if not applied:  # a management request's change, arriving right after the state thread read this
                    applied.append(True)
                    endpoint._apply(newer)
                return ready

        ready_next.deployment.__class__ = ReplacedOnRead
        assert not endpoint._promote()  # nothing ready to swap in any more
        assert applied and endpoint.instances["blue"].generation == 1 and endpoint.instances["blue"].deployment.ready
        assert endpoint.next_instances["blue"].generation == 3
        assert wait_for(lambda: endpoint._promote() or endpoint.instances["blue"].generation == 3)
        assert endpoint.instances["blue"].deployment.ready and not endpoint.next_instances
    finally:
        endpoint.stop()
        gc.unfreeze()


def test_an_alias_is_resolved_once_so_every_worker_serves_the_same_version(store: str, checkpoints: dict[str, Path]
                                                                         ) -> None:
    """A deployment of `models:/NAME@ALIAS` serves the version the alias named when the deployment was made. Before,
    every load resolved it again: after the alias moved, a worker started later (a crashed one restarted, a restart)
    or a reload after failed liveness probes served the new version beside workers serving the old one, with no
    rollout. Naming the model again in an update moves the deployment to the version the alias names then."""
    from mlflow import MlflowClient

    from registry.register import register_checkpoint
    from serving.control.control import Control

    register_checkpoint("aliased", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")
    blue = DeploymentConfig(name="blue", model="models:/aliased@champion", device="cpu", readiness_probe=QUICK_PROBE)
    config = EndpointConfig(name="aliasing", auth_mode="none", deployments=[blue], traffic={"blue": 100})
    first = Endpoint(config, tracking_uri=store)  # the first worker: the state is made, the alias resolved
    assert first.state.record("blue").model_version == "models:/aliased/1"
    register_checkpoint("aliased", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")  # version 2 takes the alias
    assert MlflowClient(store).get_model_version_by_alias("aliased", "champion").version in (2, "2")
    later = Endpoint(config, tracking_uri=store)  # a worker started after the move
    control = Control(later)
    try:
        for endpoint in (first, later):
            endpoint.start()
        for endpoint in (first, later):
            assert wait_for(lambda: endpoint.instances["blue"].deployment.ready), endpoint.status()
            assert endpoint.status().deployments["blue"].model_version == "models:/aliased/1"
        settings_only = control.update("blue", {"request_settings": {"request_timeout_ms": 30000}})
        assert settings_only.generation == 2 and later.state.record("blue").model_version == "models:/aliased/1"
        assert control.update("blue", {"model": "models:/aliased@champion"}).generation == 3
        moved = later.store.read()
        assert moved.record("blue").model_version == "models:/aliased/2"
        assert moved.last_change == "updated deployment blue to models:/aliased/2"
        for endpoint in (first, later):
            assert wait_for(lambda: endpoint.instances["blue"].generation == 3
                            and endpoint.instances["blue"].deployment.ready), endpoint.status()
            assert endpoint.status().deployments["blue"].model_version == "models:/aliased/2"
        assert control.update("blue", {"model": "models:/aliased@champion"}).generation == 3  # names the same: no-op
    finally:
        for endpoint in (first, later):
            endpoint.stop()
        gc.unfreeze()


def test_a_state_written_before_versions_were_pinned_is_pinned_when_restored(store: str,
                                                                           checkpoints: dict[str, Path]) -> None:
    from registry.register import register_checkpoint
    from serving.control.state import StateStore

    register_checkpoint("restored", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")
    blue = DeploymentConfig(name="blue", model="models:/restored@champion")
    config = EndpointConfig(name="restoring", auth_mode="none", deployments=[blue], traffic={"blue": 100})
    state_store = StateStore("restoring")
    state, _ = state_store.prepare(config, pin=lambda model: None)  # as an older Lantern wrote it
    assert state.record("blue").model_version is None
    restored, _ = state_store.prepare(config, pin=lambda model: "models:/restored/1")
    assert restored.record("blue").model_version == "models:/restored/1" and restored.revision == state.revision + 1
    assert state_store.read().record("blue").model_version == "models:/restored/1"
