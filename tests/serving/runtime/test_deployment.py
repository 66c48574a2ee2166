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
import torch
from PIL import Image

from serving.config import DeploymentConfig, Probe
from serving.runtime.deployment import Deployment
from serving.runtime.probes import Prober
from support.common import LABELS, SMALL_SETTINGS


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
    It passes if the backend answered another call while it waited (busy), and fails if nothing came back (stuck).
    Once the model is reloaded, probes pass again although the old model's call is still stuck."""
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
        assert not prober.probe_once(probe)
        assert deployment.load(fresh=True), deployment.reason  # what failed liveness probes do
        assert prober.probe_once(probe)  # the reloaded model answers while the old one is still stuck
    finally:
        for event in (first_batch, second_batch, stuck):
            event.set()
        prober.stop()
        deployment.unload()
        gc.unfreeze()


def test_a_guided_explanation_leaves_the_shared_module_to_others(store: str, checkpoints: dict[str, Path]) -> None:
    """Guided backprop hooks every ReLU of the module it runs on (captum registers gradient hooks at each forward
    pass). On the shared module, those hooks were in every other forward pass meanwhile: seen in a soak, a deployment
    of the same model failed its warm-up ("cannot register a hook on a tensor that doesn't require gradient"), and
    an integrated-gradients explanation at the same time (max_concurrent_explanations > 1) went through the guided
    ReLUs. Here the guided explanation is held mid-forward while green loads and blue explains with integrated
    gradients."""
    from registry.register import register_checkpoint
    from serving.runtime.shared_models import SharedModels

    register_checkpoint("hooked", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    models = SharedModels()
    config = DeploymentConfig(name="blue", model="models:/hooked/1", device="cpu")
    blue, green = Deployment(config, models=models), Deployment(config.model_copy(update={"name": "green"}),
                                                                 models=models)
    assert blue.load(), blue.reason
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    alone = blue.explain(picture, "integrated_gradients", {"n_steps": 8}).attributions
    reached, go_on, explained = threading.Event(), threading.Event(), []

    def hold_the_guided_one(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if threading.current_thread() is explainer and torch.is_grad_enabled() and not reached.is_set():
            reached.set()  # its gradient pass: its hooks are on whatever module it runs
            assert go_on.wait(60)

    blue.require_model().bundle.module.classifier.register_forward_hook(hold_the_guided_one)
    explainer = threading.Thread(target=lambda: explained.append(blue.explain(picture, "guided_backprop", {})))
    explainer.start()
    try:
        assert reached.wait(60)
        assert green.load(), green.reason  # its warm-up runs the shared module
        assert green.core is blue.core
        during = blue.explain(picture, "integrated_gradients", {"n_steps": 8}).attributions
        torch.testing.assert_close(during, alone)
    finally:
        go_on.set()
        explainer.join(60)
        blue.unload()
        green.unload()
        gc.unfreeze()
    assert explained and explained[0].attributions.abs().sum() > 0


def test_a_probe_of_a_stopping_instance_is_quiet_and_never_reloads_it(store: str, checkpoints: dict[str, Path],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """An instance stopped (replaced, removed) while its prober is mid-probe: the backend's thread closes under the
    probe. That failed probe said nothing about the model, yet it was logged as an error with a traceback (seen in a
    soak: adding and removing a deployment under load), and counted: with liveness probes, enough of them reloaded the
    model of a deployment that no longer existed."""
    from registry.register import register_checkpoint

    register_checkpoint("stopping", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    quick = Probe(initial_delay=0, period=0.01, failure_threshold=1)
    deployment = Deployment(DeploymentConfig(name="blue", model="models:/stopping/1", device="cpu",
                                             readiness_probe=quick, liveness_probe=quick))
    loads = []

    class StoppedUnderItsProbe(Prober):
        def probe_once(self, probe: Probe) -> bool:
            loads.append(deployment.core)
            self.stop()  # the instance stops during the probe: its backend's thread closes
            deployment.require_model().predictor.thread.close()
            return super().probe_once(probe)

    prober = StoppedUnderItsProbe(deployment)
    try:
        with caplog.at_level("INFO", logger="lantern.serving"):
            prober.run()  # loads, probes once, and returns: stopped
        assert len(loads) == 1 and deployment.core is loads[0]  # not reloaded
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    finally:
        deployment.unload()
        gc.unfreeze()


def test_deployments_of_one_model_share_it_until_the_last_lets_go(store: str, checkpoints: dict[str, Path]) -> None:
    """Blue and green (an alias of the same version, other request settings and resize) share one module and one
    session, as does a crop override equal to the version's crop; another version, crop size or backend loads its
    own. A reload after failed liveness probes (`fresh`) does not take back the model it had (it may be stuck) but
    shares one another deployment already reloaded; a shared model's backend thread ends with its last user."""
    from registry.register import register_checkpoint
    from serving.runtime.shared_models import SharedModels

    for alias in ("champion", None):
        register_checkpoint("twins", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                            alias=alias)
    models = SharedModels()
    configs = {"blue": {"model": "models:/twins/1"},
               "green": {"model": "models:/twins@champion", "settings": {"valid_resize_size": 36},
                         "request_settings": {"request_timeout_ms": 90000}},
               "version2": {"model": "models:/twins/2"},
               "crop24": {"model": "models:/twins/1", "settings": {"valid_resize_size": 30, "valid_crop_size": 24}},
               "crop32": {"model": "models:/twins/1", "settings": {"valid_crop_size": 32}},  # the version's own
               "torch": {"model": "models:/twins/1", "backend": "torch"}}
    deployments = {name: Deployment(DeploymentConfig(name=name, device="cpu", **config), models=models)
                   for name, config in configs.items()}
    try:
        for deployment in deployments.values():
            assert deployment.load(), deployment.reason
        loaded = {name: deployment.require_model() for name, deployment in deployments.items()}
        blue, green = loaded["blue"], loaded["green"]
        assert green.predictor is blue.predictor and green.bundle.module is blue.bundle.module
        assert loaded["crop32"].predictor is blue.predictor  # a crop override equal to the version's own
        assert green.guided is blue.guided  # the copy that guided methods hook, one at a time
        assert len({id(model.predictor) for model in loaded.values()}) == 4
        assert (green.preprocess.resize_size, blue.preprocess.resize_size) == (36, 40)  # settings stay their own

        old = blue.predictor
        assert deployments["green"].load(fresh=True), deployments["green"].reason
        fresh = deployments["green"].require_model().predictor
        assert fresh is not old and deployments["blue"].require_model().predictor is old
        crop = blue.settings.valid_crop_size
        assert deployments["blue"].load(fresh=True), deployments["blue"].reason  # shares green's new one, no third
        assert deployments["blue"].require_model().predictor is fresh
        assert fresh(np.zeros((1, 3, crop, crop), dtype=np.float32)).shape == (1, len(LABELS))

        deployments["green"].unload()
        assert fresh(np.zeros((1, 3, crop, crop), dtype=np.float32)).shape == (1, len(LABELS))  # blue still uses it
        deployments["blue"].unload()  # its last user
        with pytest.raises(RuntimeError):
            fresh.thread.submit(print)
        assert deployments["blue"].load(), deployments["blue"].reason  # loads anew: none is left to share
        assert deployments["blue"].require_model().predictor not in (old, fresh)
    finally:
        for deployment in deployments.values():
            deployment.unload()
        gc.unfreeze()


@pytest.mark.parametrize("stage", ["_load_core", "_warm_up"])
def test_a_deployment_stopped_while_it_loads_lets_its_model_go(stage: str, store: str,
                                                                checkpoints: dict[str, Path]) -> None:
    """A deployment removed or replaced while it loads (or warms up) is unloaded before its model arrives: the load
    then lets that model go (its backend thread ends) and reports False. Before, the model stayed in the worker's
    shared models with a user that was gone: never closed, and shared with the next deployment of that model."""
    from registry.register import register_checkpoint
    from serving.runtime.shared_models import SharedModels

    register_checkpoint("ghosts", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    models = SharedModels()
    reached, go_on = threading.Event(), threading.Event()
    cores = []

    class HeldAtStage(Deployment):
        """A deployment whose load waits at `stage` until the test lets it go on (the stop comes in between)."""

        def _load_core(self, *args):
            if stage == "_load_core":
                reached.set()
                assert go_on.wait(60)
            cores.append(super()._load_core(*args))
            return cores[-1]

        def _warm_up(self, model):
            if stage == "_warm_up":
                reached.set()
                assert go_on.wait(60)
            return super()._warm_up(model)

    config = DeploymentConfig(name="ghost", model="models:/ghosts/1", device="cpu")
    ghost = HeldAtStage(config, models=models)
    loaded = []
    loader = threading.Thread(target=lambda: loaded.append(ghost.load()))
    loader.start()
    blue = Deployment(config.model_copy(update={"name": "blue"}), models=models)
    try:
        assert reached.wait(60)
        ghost.unload()
        go_on.set()
        loader.join(60)
        assert loaded == [False] and ghost.model is None and (ghost.state, ghost.reason) == ("unready", "stopped")
        with pytest.raises(RuntimeError):  # its backend's thread has ended
            cores[0].predictor.thread.submit(print)
        assert blue.load(), blue.reason
        assert blue.core is not cores[0] and blue.core.users == {id(blue)}  # nothing left over to share
    finally:
        go_on.set()
        loader.join(60)
        blue.unload()
        gc.unfreeze()


def test_a_model_that_fails_its_warm_up_is_let_go(store: str, checkpoints: dict[str, Path]) -> None:
    """A crop too small for the network (8 px: its pooling ends below one pixel) fails the warm-up: the deployment is
    failed with the reason, and the model it loaded is released (its backend thread ends) rather than held, shared,
    until the deployment is removed."""
    from registry.register import register_checkpoint
    from serving.runtime.shared_models import SharedModels

    register_checkpoint("tiny", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    cores = []

    class Recorded(Deployment):
        def _load_core(self, *args):
            cores.append(super()._load_core(*args))
            return cores[-1]

    config = DeploymentConfig(name="cramped", model="models:/tiny/1", device="cpu", settings={"valid_crop_size": 8})
    deployment = Recorded(config, models=SharedModels())
    try:
        assert not deployment.load()
        assert deployment.state == "failed" and deployment.reason, deployment.reason
        assert deployment.core is None and len(cores) == 1
        with pytest.raises(RuntimeError):
            cores[0].predictor.thread.submit(print)
    finally:
        deployment.unload()
        gc.unfreeze()
