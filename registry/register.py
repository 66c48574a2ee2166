"""Registering a checkpoint as a new MLflow model version, and registering a version with new settings."""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from torch import nn

from registry.checkpoint import fit_state_dict, load_state_dict
from registry.detection_inference import torch_detector
from registry.detector_onnx import detector_parity, export_detector_onnx, parity_images
from registry.detectors import apply_detection_settings
from registry.errors import CheckpointError, ParityError, SpecError
from registry.labels import validate_labels
from registry.model_files import (
    CHECKPOINTS_DIR,
    DEFAULT_PARITY_TOLERANCE,
    SPEC,
    TAG_BACKENDS,
    TAG_DERIVED_FROM,
    TAG_FILES_DIGEST,
    TAG_ONNX_REFUSED,
    TAG_PARITY,
    TAG_TRAINING_ITERATION,
    TAG_TRAINING_SESSION,
    WEIGHTS,
    ModelFiles,
    checkpoint_dir,
    write_metadata,
)
from registry.onnx_export import check_parity, export_onnx, parity_max_abs_diff
from registry.pyfunc_model import SIGNATURE
from registry.references import NAME_PATTERN, validate_alias, version_uri
from registry.resolve import download_version
from registry.settings import DetectionSettings, TaskSettings, build_settings, with_overrides
from registry.spec import ModelSpec, build_module, make_spec
from registry.store import experiment_id, open_client, write_lock

PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")
REGISTER_ATTEMPTS = 8


class Progress(Protocol):
    """Receives the slow steps of a registration, e.g. to show them on a terminal."""

    def step(self, description: str) -> contextlib.AbstractContextManager[None]: ...


class SilentProgress:
    """Progress that shows nothing."""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class RegisteredVersion:
    """The outcome of a registration."""

    name: str
    version: int
    run_id: str
    onnx_max_abs_diff: float | None  # None: registered without ONNX (onnx_refused says why)
    alias: str | None = None
    onnx_refused: str | None = None

    @property
    def uri(self) -> str:
        return version_uri(self.name, self.version)


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise SpecError(
            f"invalid model name {name!r}: use letters, digits, '_', '.' and '-' (starting with a letter or digit)"
        )
    return name


def _requirements() -> list[str]:
    """Pinned requirements of the pyfunc model, as installed here."""
    names = ["torch", "torchvision", "onnxruntime-gpu", "pillow", "numpy", "pandas", "safetensors", "pydantic",
             "mlflow", "scikit-image"]
    pins = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
    return pins


def _check_runs(model: nn.Module, spec: ModelSpec, image_size: int) -> None:
    with torch.inference_mode():
        out = model(torch.randn(2, 3, image_size, image_size))
    if tuple(out.shape) != (2, spec.num_classes):
        raise SpecError(f"the model returns shape {tuple(out.shape)}, expected (batch, {spec.num_classes})")
    if not torch.isfinite(out).all():
        raise SpecError("the model returns non-finite values (NaN or inf) with these weights")


def _check_detector_runs(model: nn.Module, settings: DetectionSettings) -> None:
    found = torch_detector(model, "cpu")(parity_images(settings)[0])
    if not all(np.isfinite(values).all() for values in (found.boxes, found.scores)):
        raise SpecError("the detector returns non-finite boxes or scores (NaN or inf) with these weights")


@dataclass(frozen=True)
class OnnxOutcome:
    """What became of a version's ONNX export: its parity with torch, or why it was left out."""

    parity: float | None
    refused: str | None = None

    def tags(self) -> dict[str, str]:
        if self.parity is None:
            return {TAG_BACKENDS: "torch", TAG_ONNX_REFUSED: str(self.refused)}
        return {TAG_BACKENDS: "onnxruntime,torch", TAG_PARITY: f"{self.parity:.6g}"}


def _export_classifier(model: nn.Module, settings: TaskSettings, files: ModelFiles, tolerance: float,
                       progress: Progress) -> OnnxOutcome:
    """A classifier's ONNX export and its parity: a mismatch refuses the registration."""
    with progress.step("Exporting ONNX (dynamic batch and image axes)"):
        export_onnx(model, settings.valid_crop_size, files.onnx)
    with progress.step("Checking ONNX Runtime against torch"):
        parity = parity_max_abs_diff(model, files.onnx, settings.valid_crop_size)
        check_parity(parity, tolerance)
    return OnnxOutcome(parity)


def _export_detector(model: nn.Module, settings: DetectionSettings, files: ModelFiles, tolerance: float,
                     progress: Progress) -> OnnxOutcome:
    """A detector's ONNX export (its settings are part of the graph) and its parity after matching detections;
    where it does not export faithfully, the version is registered for the torch backend and says why."""
    try:
        with progress.step("Exporting ONNX (any image size; the settings are part of the graph)"):
            export_detector_onnx(model, settings.min_size, files.onnx)
        with progress.step("Checking ONNX Runtime's detections against torch's"):
            parity = detector_parity(model, files.onnx, settings)
            check_parity(parity, tolerance)
        return OnnxOutcome(parity)
    except (ParityError, RuntimeError, ValueError, TypeError) as error:  # the exporter's and ONNX Runtime's failures
        files.onnx.unlink(missing_ok=True)
        return OnnxOutcome(None, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")


def _register_with_retries(client: MlflowClient, name: str, source: str, run_id: str, model_id: str | None,
                           tags: dict[str, str]) -> int:
    """Create the registered model if needed and a new version; concurrent writers each get their own version."""
    for attempt in range(REGISTER_ATTEMPTS):
        try:
            try:
                client.create_registered_model(name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(error):
                    raise
            version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
            return int(version.version)
        except MlflowException as error:
            transient = any(word in str(error).lower() for word in ("locked", "giving up", "integrity", "busy"))
            if not transient or attempt == REGISTER_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (2**attempt) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _log_and_register(client: MlflowClient, name: str, files: ModelFiles, spec: ModelSpec, onnx: OnnxOutcome,
                      params: dict[str, Any], alias: str | None, extra_tags: dict[str, str]) -> RegisteredVersion:
    """Log ONE pyfunc MLflow model holding `files` to a new run, and register it as a new version of `name`."""
    with write_lock(client.tracking_uri):
        with mlflow.start_run(experiment_id=experiment_id(client), run_name=f"register-{name}") as run:
            mlflow.log_params(params)
            if onnx.parity is not None:
                mlflow.log_metric("onnx_max_abs_diff", onnx.parity)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "no input example": predicting needs a real image
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_ENTRY),
                    artifacts=files.as_artifacts(),
                    signature=SIGNATURE,
                    pip_requirements=_requirements(),
                    metadata={"lantern_spec": spec.model_dump(mode="json")},
                )
        tags = {"lantern.arch": spec.arch, "lantern.task": spec.task, TAG_FILES_DIGEST: files.digest(), **onnx.tags(),
                **extra_tags}
        version = _register_with_retries(client, name, info.model_uri, run.info.run_id, info.model_id, tags)
        if alias:
            client.set_registered_model_alias(name, alias, str(version))
    return RegisteredVersion(name, version, run.info.run_id, onnx.parity, alias, onnx.refused)


def register_checkpoint(
    name: str,
    checkpoint: str | Path,
    arch: str,
    labels: list[str],
    task: str,
    settings_overrides: dict[str, Any] | None = None,
    *,
    alias: str | None = None,
    num_classes: int | None = None,
    gradcam_layer: str | None = None,
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
    tracking_uri: str | None = None,
    progress: Progress | None = None,
    tags: dict[str, str] | None = None,
) -> RegisteredVersion:
    """Check a checkpoint end to end and register it as a new version of `name`; returns the version."""
    progress = progress or SilentProgress()
    validate_name(name)
    if alias:
        validate_alias(alias)
    labels = validate_labels(list(labels))
    if num_classes is not None and num_classes != len(labels):
        raise SpecError(f"num_classes is {num_classes} but the labels file lists {len(labels)} labels")
    spec = make_spec(arch, len(labels), task, gradcam_layer)
    settings = build_settings(task, settings_overrides)
    with progress.step(f"Loading checkpoint {Path(checkpoint).name}"):
        state_dict = load_state_dict(checkpoint)
    with progress.step(f"Rebuilding {arch} and checking the weights fit"):
        model = build_module(spec)
        fit_state_dict(model, state_dict)
        if isinstance(settings, DetectionSettings):
            _check_detector_runs(apply_detection_settings(model, settings), settings)
        else:
            _check_runs(model, spec, settings.valid_crop_size)
    workdir = Path(tempfile.mkdtemp(prefix="lantern-register-"))
    try:
        files = ModelFiles.in_dir(workdir)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files.weights))
        write_metadata(files, spec, labels, settings)
        onnx = (_export_detector(model, settings, files, parity_tolerance, progress)
                if isinstance(settings, DetectionSettings) else
                _export_classifier(model, settings, files, parity_tolerance, progress))
        client = open_client(tracking_uri)
        with progress.step(f"Logging to MLflow and registering {name}"):
            params = {"arch": arch, "task": task, "num_classes": len(labels), "gradcam_layer": spec.gradcam_layer,
                      "checkpoint": Path(checkpoint).name, **settings.model_dump()}
            return _log_and_register(client, name, files, spec, onnx, params, alias, dict(tags or {}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def latest_session_iteration(session_dir: str | Path) -> int:
    """The iteration of the newest complete checkpoint of a training session."""
    iterations = _session_iterations(session_dir)
    if not iterations:
        raise CheckpointError(f"{session_dir} holds no training checkpoints")
    return iterations[-1]


def register_session_checkpoint(
    name: str,
    session_dir: str | Path,
    iteration: int | None = None,
    settings_overrides: dict[str, Any] | None = None,
    *,
    alias: str | None = None,
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
    tracking_uri: str | None = None,
    progress: Progress | None = None,
    tags: dict[str, str] | None = None,
) -> RegisteredVersion:
    """Register a training session's checkpoint at `iteration` (default: the newest) with its spec, labels and
    settings (plus `settings_overrides`)."""
    iteration = latest_session_iteration(session_dir) if iteration is None else iteration
    folder = checkpoint_dir(session_dir, iteration)
    if not (folder / SPEC).is_file():
        available = ", ".join(str(i) for i in _session_iterations(session_dir)) or "none"
        raise CheckpointError(f"{session_dir} has no checkpoint at iteration {iteration}; it has: {available}")
    files = ModelFiles.in_dir(folder)
    spec = files.read_spec()
    settings = {**files.read_settings(spec.task).model_dump(), **(settings_overrides or {})}
    session_tags = {TAG_TRAINING_SESSION: str(Path(session_dir).resolve()), TAG_TRAINING_ITERATION: str(iteration)}
    return register_checkpoint(
        name, files.weights, spec.arch, files.read_labels(), spec.task, settings, alias=alias,
        gradcam_layer=spec.gradcam_layer, parity_tolerance=parity_tolerance, tracking_uri=tracking_uri,
        progress=progress, tags={**session_tags, **(tags or {})},
    )


def _session_iterations(session_dir: str | Path) -> list[int]:
    folders = (Path(session_dir) / CHECKPOINTS_DIR).glob("iteration-*")
    return sorted(int(f.name.removeprefix("iteration-")) for f in folders if (f / SPEC).is_file() and (f / WEIGHTS).is_file())


def register_settings_update(
    name: str,
    version: int | str,
    overrides: dict[str, Any],
    *,
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
    tracking_uri: str | None = None,
    progress: Progress | None = None,
) -> RegisteredVersion:
    """Register a NEW version of `name` with `version`'s weights and its settings updated by `overrides`."""
    progress = progress or SilentProgress()
    client = open_client(tracking_uri)
    with progress.step(f"Fetching {name}/{version}"):
        source = download_version(client, version_uri(name, version))
    spec = source.files.read_spec()
    old_settings = source.files.read_settings(spec.task)
    settings = with_overrides(old_settings, spec.task, overrides)
    if settings == old_settings:
        raise SpecError(f"the settings of {name}/{version} already have these values; no version registered")
    workdir = Path(tempfile.mkdtemp(prefix="lantern-settings-"))
    try:
        files = ModelFiles.in_dir(workdir)
        for key in ("weights", "spec", "labels"):
            shutil.copyfile(getattr(source.files, key), getattr(files, key))
        files.settings.write_text(settings.model_dump_json(indent=2) + "\n")
        model = build_module(spec)
        fit_state_dict(model, load_state_dict(files.weights))
        if isinstance(settings, DetectionSettings):  # the settings are part of a detector's graph: export it again
            onnx = _export_detector(apply_detection_settings(model, settings), settings, files, parity_tolerance,
                                    progress)
        else:
            shutil.copyfile(source.files.onnx, files.onnx)
            with progress.step(f"Checking ONNX Runtime against torch at {settings.valid_crop_size}px"):
                parity = parity_max_abs_diff(model, files.onnx, settings.valid_crop_size)
                check_parity(parity, parity_tolerance)
            onnx = OnnxOutcome(parity)
        with progress.step(f"Logging to MLflow and registering a new version of {name}"):
            params = {"arch": spec.arch, "task": spec.task, "derived_from": f"{name}/{version}", **settings.model_dump()}
            return _log_and_register(client, name, files, spec, onnx, params, None,
                                     {TAG_DERIVED_FROM: f"{name}/{version}"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
