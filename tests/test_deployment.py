"""A deployment's lifecycle in-process: loaded objects are frozen out of Python's full garbage collections (they
stalled every request under load), and a stopped deployment's model is still collected, reference cycles included."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np

from serving.config import DeploymentConfig
from serving.deployment import Deployment
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
    gc.freeze()  # the module is frozen now, as in a worker that loaded another deployment after it
    del model

    try:
        deployment.unload()
        assert freed() is None
        assert (deployment.model, deployment.state, deployment.reason) == (None, "unready", "stopped")
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
