"""A deployment's lifecycle in-process: loaded objects are frozen out of Python's full garbage collections (they
stalled every request under load), a stopped deployment's model is still collected, reference cycles included, and a
probe tells a busy backend from a stuck one."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

from serving.config import DeploymentConfig, Probe
from serving.deployment import Deployment
from serving.probes import Prober
from tests.conftest import LABELS, SMALL_SETTINGS


def test_a_stopped_deployment_frees_its_model_although_loading_froze_it(store: str,
                                                                         checkpoints: dict[str, Path]) -> None:
    from registry.register import register_checkpoint

    register_checkpoint("frozen", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/frozen/1", device="cpu"))
    assert deployment.load(), deployment.reason
    assert gc.get_freeze_count() > 0  # what loading left is out of the automatic collections
    model = deployment.require_model()
    model.bundle.module.loop = [model.bundle.module]  # a reference cycle: only the cyclic collector frees it
    crop = model.settings.valid_crop_size
    assert model.predictor(np.zeros((1, 3, crop, crop), dtype=np.float32)).shape == (1, len(LABELS))
    freed = weakref.ref(model.bundle.module)
    thread = model.predictor.thread
    gc.freeze()  # the module is frozen now, as in a worker that loaded another deployment after it
    del model

    try:
        deployment.unload()
        assert freed() is None
        with pytest.raises(RuntimeError):  # the backend's own thread ended with it
            thread.submit(print)
        assert (deployment.model, deployment.state, deployment.reason) == (None, "unready", "stopped")
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


def test_a_probe_behind_live_batches_passes_when_the_backend_answers_meanwhile(store: str,
                                                                               checkpoints: dict[str, Path]) -> None:
    """The backend runs one call at a time: a probe queued behind batches of live traffic may wait past its timeout.
    It passes if the backend answered another call while it waited (busy), and fails if nothing came back (stuck)."""
    from registry.register import register_checkpoint

    register_checkpoint("probed", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/probed/1", device="cpu"))
    assert deployment.load(), deployment.reason
    thread = deployment.require_model().predictor.thread
    prober = Prober(deployment)
    probe = Probe(timeout=1.0)
    first_batch, second_batch, stuck = threading.Event(), threading.Event(), threading.Event()
    try:
        assert prober.probe_once(probe)  # idle: the probe itself answers
        thread.submit(first_batch.wait)  # two long batches ahead of the probe
        thread.submit(second_batch.wait)
        threading.Timer(0.05, first_batch.set).start()  # the first comes back while the probe waits
        assert prober.probe_once(probe)  # timed out behind the second, but the backend answered: busy
        second_batch.set()
        assert prober.probe_once(probe)
        thread.submit(stuck.wait)  # nothing comes back within the timeout: stuck
        assert not prober.probe_once(probe)
    finally:
        for event in (first_batch, second_batch, stuck):
            event.set()
        prober.stop()
        deployment.unload()
        gc.unfreeze()
