"""A deployment: one registered model version loaded for serving, with its state (loading, ready, failed)."""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from explain.attribute import Explanation, attribute
from explain.layout import fastest_layout
from explain.params import GUIDED_METHODS
from registry.detection_answers import RawDetections
from registry.detector_onnx import export_detector_onnx, graph_settings
from registry.detectors import apply_detection_settings
from registry.devices import device_key, torch_device
from registry.errors import LanternError
from registry.postprocess import predicted_from_logits, predicted_indices, probabilities
from registry.preprocess import Preprocess
from registry.resolve import DownloadedVersion, ModelBundle, bundle_of, download_version
from registry.settings import ClassificationSettings, DetectionSettings, TaskSettings, with_overrides
from registry.spec import ModelSpec
from registry.store import open_client
from serving.config import DeploymentConfig
from serving.runtime.abandon import make_abandonable
from serving.runtime.errors import NotReady
from serving.runtime.predictors import DetectorPredictor, OnnxPredictor, Predictor, TorchPredictor, shape_buckets
from serving.runtime.shared_models import GuidedCopy, ModelCore, SharedModels

logger = logging.getLogger("lantern.serving")
State = Literal["loading", "ready", "unready", "failed"]


@dataclass
class Prediction:
    """Probabilities in label order and the predicted label indices of one image."""

    probs: np.ndarray
    predicted: list[int]


@dataclass
class LoadedModel:
    """What a ready deployment serves with: a classifier's preprocessing, or a detector's settings (no preprocessing:
    the detector resizes its inputs itself)."""

    bundle: ModelBundle
    settings: TaskSettings
    preprocess: Preprocess | None
    predictor: Predictor
    explain_device: torch.device
    guided: GuidedCopy  # the module's copy that guided methods hook

    @property
    def detects(self) -> bool:
        """Whether the model answers boxes (object detection, instance segmentation)."""
        return isinstance(self.settings, DetectionSettings)

    def probe_image(self) -> np.ndarray:
        """An input the backend must answer: a black crop (float32) for a classifier, a black uint8 image of the
        detector's size for a detector."""
        if isinstance(self.settings, DetectionSettings):
            return np.zeros((3, self.settings.min_size, self.settings.min_size), np.uint8)
        crop = self.settings.valid_crop_size
        return np.zeros((3, crop, crop), np.float32)

    @staticmethod
    def finite(answer: np.ndarray | list[RawDetections]) -> bool:
        """Whether a backend's answer holds only finite numbers (logits, or detections' boxes and scores)."""
        if isinstance(answer, np.ndarray):
            return bool(np.all(np.isfinite(answer)))
        return all(np.isfinite(found.boxes).all() and np.isfinite(found.scores).all() for found in answer)


def explain_version(module: torch.nn.Module, spec: ModelSpec, settings: ClassificationSettings, x: torch.Tensor,
                    cropped: Image.Image, method: str, params: dict[str, Any], targets: list[int] | None = None,
                    threshold: float | None = None) -> Explanation:
    """Explain one normalised image `x` (the crop `cropped`) with a version's module, as its spec and settings say:
    its Grad-CAM layer and normalisation, and by default its prediction by the registry's rule (every label over
    the threshold for multi-label). The server and `lantern explain` both explain through here."""
    def predicted(logits: np.ndarray) -> list[int]:
        return predicted_from_logits(logits, spec.task, settings, threshold)

    return attribute(module, x, method, params, targets=predicted if targets is None else targets,
                     gradcam_layer=spec.gradcam_layer, mean=spec.normalize_mean, std=spec.normalize_std,
                     image=np.asarray(cropped))


def exported_with(module: torch.nn.Module, folder: Path, settings: DetectionSettings) -> Path:
    """The ONNX export of a detector (`module`, with `settings` applied) beside its version's files, made once per
    settings (a file of each worker's is written whole, then moved into place)."""
    name = "model-" + hashlib.sha256(repr(graph_settings(settings)).encode()).hexdigest()[:12] + ".onnx"
    path = folder / name
    if not path.is_file():
        staging = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
        export_detector_onnx(copy.deepcopy(module).cpu(), settings.min_size, staging)
        os.replace(staging, path)
    return path


def freeze_long_lived_objects() -> None:
    """Leave what is loaded by now (the libraries, the models: hundreds of thousands of objects in a worker) out of
    Python's full garbage collections, which requests' short-lived objects trigger every few seconds under load:
    walking it all stalls every request in flight. Frozen objects are never collected, so each call first collects
    everything, also what an earlier freeze kept (a retired model in a reference cycle)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Deployment:
    """Loads its model version in the background, warms it up, and only then reports ready."""

    def __init__(self, config: DeploymentConfig, tracking_uri: str | None = None,
                 models: SharedModels | None = None, version: str | None = None) -> None:
        self.config = config
        self.tracking_uri = tracking_uri
        self.version = version  # models:/NAME/N it was pinned to (the endpoint state's); None: config.model, now
        self.models = models  # the worker's loaded models, shared with other deployments of the same; None: its own
        self._core: ModelCore | None = None
        self._lifecycle = threading.Lock()
        self._unloads = 0  # a load under way when this grows (the deployment was stopped) lets its model go
        self.state: State = "loading"
        self.reason: str | None = None
        self.model: LoadedModel | None = None
        self.loaded_at: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def model_version(self) -> str | None:
        return self.model.bundle.uri if self.model else None

    def load(self, fresh: bool = False) -> bool:
        """Resolve, load (or share a model already loaded; `fresh`: not the one this deployment has), warm up. The
        state stays `loading` (the readiness probe makes it `ready`), or becomes `failed` with the reason. False also
        when the deployment is unloaded meanwhile (removed or replaced while it loads): what this load brought is let
        go, not kept."""
        self.state = "loading"
        unloads = self._unloads
        try:
            model = self._load(fresh, unloads)
        except Exception as error:  # noqa: BLE001 - any load failure is shown as the deployment's state
            if self._unloads != unloads:  # stopped meanwhile (its warm-up may have met the closed backend)
                return False
            with self._lifecycle:  # a model that failed its warm-up is not kept (nor shared) while nothing uses it
                core, self._core = self._core, None
            self._let_go(core)
            if isinstance(error, LanternError):
                self._fail(str(error))
            else:
                logger.exception("deployment %s failed to load", self.name)
                self._fail(f"{type(error).__name__}: {error}")
            return False
        with self._lifecycle:
            if self._unloads != unloads:  # stopped during the warm-up: unload has let the model go
                return False
            self.model = model
            shared = self._core is not None and len(self._core.users) > 1
        self.loaded_at = time.monotonic()
        logger.info("deployment %s loaded: %s on %s%s", self.name, model.bundle.uri, model.predictor.description,
                    " (shared with another deployment)" if shared else "")
        freeze_long_lived_objects()
        return True

    def unload(self) -> None:
        """Let go of the model once its instance has stopped, and collect it (device memory included) when no other
        deployment shares it. The backend's thread ends first, after the call it may be running: its sessions are
        never torn down under a run, nor before the thread that ran them (CUDA libraries keep per-thread state for
        them). A load under way lets go of what it brings."""
        with self._lifecycle:
            self._unloads += 1
            model, self.model = self.model, None
            core, self._core = self._core, None
            self.state, self.reason = "unready", "stopped"
        self._let_go(core)
        del model, core
        freeze_long_lived_objects()

    def _let_go(self, core: ModelCore | None) -> None:
        """Done with `core`: its last user ends its backend's thread."""
        if core is not None and (self.models is None or self.models.release(core, self)):
            core.predictor.thread.close()

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.reason = reason
        logger.error("deployment %s failed: %s", self.name, reason)

    def _load(self, fresh: bool, unloads: int) -> LoadedModel:
        config = self.config
        device = torch_device(config.device)
        buckets = shape_buckets(device, config.backend, config.max_batch_size)
        # the pinned version, else the one `model` names now: resolved once, so the key and the load name the same one
        downloaded = download_version(open_client(self.tracking_uri), self.version or config.model)
        spec = downloaded.files.read_spec()
        settings = with_overrides(downloaded.files.read_settings(spec.task), spec.task, config.settings)
        if self.models is None:
            core = self._load_core(downloaded, device, buckets, settings)
        else:
            # the crop in force (the warm-up and a GPU's sessions see that input size); a detector's settings that
            # are part of its graph
            shape = graph_settings(settings) if isinstance(settings, DetectionSettings) else settings.valid_crop_size
            key = (downloaded.uri, config.backend, device_key(config.device), buckets, shape)
            core = self.models.acquire(key, self, lambda: self._load_core(downloaded, device, buckets, settings),
                                       avoid=self._core if fresh else None)
        with self._lifecycle:
            unloaded = self._unloads != unloads
            if not unloaded:
                previous, self._core = self._core, core
        if unloaded:
            self._let_go(core)
            raise LanternError(f"deployment {self.name} was stopped while it loaded")
        if previous is not None and previous is not core and self.models is not None:
            self.models.release(previous, self)  # a reload: the old one is dropped, not closed (it may be stuck)
        bundle = core.bundle
        preprocess = None if isinstance(settings, DetectionSettings) else Preprocess.for_model(bundle.spec, settings)
        model = LoadedModel(bundle, settings, preprocess, core.predictor, device, core.guided)
        self._warm_up(model)
        return model

    def _load_core(self, downloaded: DownloadedVersion, device: torch.device, buckets: tuple[int, ...] | None,
                   settings: TaskSettings) -> ModelCore:
        """The version's module (for explanations) and its predictor, on `device`."""
        bundle = bundle_of(downloaded, device=str(device))
        if isinstance(settings, DetectionSettings):
            return ModelCore(bundle, self._detector_predictor(bundle, device, settings))
        fastest_layout(bundle.module)  # channels-last on the CPU: explanations' gradient passes 20-40 % faster
        make_abandonable(bundle.module)
        predictor: Predictor = (OnnxPredictor(bundle.onnx_path, device, buckets=buckets)
                                if self.config.backend == "onnxruntime" else TorchPredictor(bundle.module, device))
        return ModelCore(bundle, predictor)

    def _detector_predictor(self, bundle: ModelBundle, device: torch.device,
                            settings: DetectionSettings) -> DetectorPredictor:
        """The detector with the deployment's settings: the torch module with them applied, or the version's ONNX
        export (exported again, once per version and settings, where the deployment overrides settings that are part
        of its graph)."""
        module = apply_detection_settings(bundle.module, settings)  # shared only with deployments of these settings
        if self.config.backend == "torch":
            return DetectorPredictor.torch(module, device)
        if bundle.onnx_path is None:
            raise LanternError(f"{bundle.uri} has no ONNX export (it did not export faithfully: see `lantern models "
                               f"show {bundle.name}/{bundle.version}`); serve it with backend: torch")
        path = bundle.onnx_path
        if graph_settings(settings) != graph_settings(bundle.settings):
            path = exported_with(module, bundle.onnx_path.parent, settings)
        return DetectorPredictor.onnx(path, device)

    def _warm_up(self, model: LoadedModel) -> None:
        """Run the backend on a batch of 1 and a larger one (on a GPU, every batch size it runs), and the module once,
        before taking traffic."""
        if model.detects:
            for count in sorted({1, min(self.config.max_batch_size, 2)}):
                if not model.finite(model.predictor([model.probe_image()] * count)):
                    raise LanternError("the detector answers non-finite boxes or scores for a black image")
            return
        crop = model.settings.valid_crop_size
        for size in model.predictor.buckets or sorted({1, min(self.config.max_batch_size, 8)}):
            logits = model.predictor(np.zeros((size, 3, crop, crop), dtype=np.float32))
            if logits.shape != (size, len(model.bundle.labels)):
                raise LanternError(f"the model answers logits of shape {logits.shape} for {size} image(s); "
                                   f"expected ({size}, {len(model.bundle.labels)})")
        with torch.inference_mode():
            model.bundle.module(torch.zeros(1, 3, crop, crop, device=model.explain_device))

    @property
    def core(self) -> ModelCore | None:
        """The loaded model as shared with other deployments of it (None until loaded)."""
        return self._core

    def require_model(self) -> LoadedModel:
        """The loaded model; NotReady while there is none (loading, failed, or unloaded by a retirement)."""
        model = self.model
        if model is None:
            raise NotReady(f"deployment {self.name} is {self.state}; retry when /readyz answers 200")
        return model

    def postprocess(self, logits: np.ndarray, threshold: float | None = None) -> list[Prediction]:
        model = self.require_model()
        task = model.bundle.spec.task
        probs = probabilities(logits, task)
        chosen = predicted_indices(probs, task, model.settings, threshold)
        return [Prediction(row, picks) for row, picks in zip(probs, chosen)]

    def explanation_targets(self, cropped: Image.Image) -> list[int]:
        """The label indices `explain` explains by default for `cropped`: its prediction by the version's module."""
        model = self.require_model()
        x = model.preprocess.normalize(cropped).to(model.explain_device)
        with torch.no_grad():
            logits = model.bundle.module(x[None])[0].float().cpu().numpy()
        return predicted_from_logits(logits, model.bundle.spec.task, model.settings)

    def explain(self, cropped: Image.Image, method: str, params: dict[str, Any],
                targets: list[int] | None = None, threshold: float | None = None) -> Explanation:
        """Explain one cropped image with the version's module; guided methods, which hook the module they run on,
        run on its private copy, one at a time (see GuidedCopy)."""
        model = self.require_model()
        x = model.preprocess.normalize(cropped).to(model.explain_device)
        spec = model.bundle.spec

        def run(module: torch.nn.Module) -> Explanation:
            return explain_version(module, spec, model.settings, x, cropped, method, params, targets, threshold)

        if method in GUIDED_METHODS:
            with model.guided.hold() as module:
                return run(module)
        return run(model.bundle.module)
