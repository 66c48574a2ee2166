"""The files that make up a registered model version, and reading them back into typed objects."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from registry.errors import SpecError, describe_validation_error
from registry.labels import validate_labels
from registry.settings import TaskSettings, build_settings
from registry.spec import ModelSpec

WEIGHTS = "weights.safetensors"
SPEC = "spec.json"
LABELS = "labels.json"
SETTINGS = "settings.json"
ONNX = "model.onnx"
TAG_PARITY = "lantern.onnx_max_abs_diff"
TAG_FILES_DIGEST = "lantern.files_sha256"  # the files as registered: every download is checked against it
DEFAULT_PARITY_TOLERANCE = 1e-3  # the largest ONNX vs torch logit difference registration accepts by default
TAG_DERIVED_FROM = "lantern.derived_from"
ARTIFACT_KEYS = {"weights": WEIGHTS, "spec": SPEC, "labels": LABELS, "settings": SETTINGS, "onnx": ONNX}
OPTIONAL_ARTIFACTS = {"onnx"}  # a detector that does not export faithfully is registered without it
TAG_BACKENDS = "lantern.backends"  # "onnxruntime,torch", or "torch" for a version registered without ONNX
TAG_ONNX_REFUSED = "lantern.onnx_refused"  # why a version has no ONNX export
TAG_TRAINING_SESSION = "lantern.training_session"
TAG_TRAINING_ITERATION = "lantern.training_iteration"
TAG_TRAINING_RUN = "lantern.training_run_id"
CHECKPOINTS_DIR = "checkpoints"


def checkpoint_dir(session_dir: str | Path, iteration: int) -> Path:
    """Where a training session keeps its checkpoint at `iteration`: weights, spec, labels and settings as in a
    registered version (registry reads it for `lantern register --from-session`; training writes it)."""
    return Path(session_dir) / CHECKPOINTS_DIR / f"iteration-{iteration:08d}"


@dataclass(frozen=True)
class ModelFiles:
    """Paths of one version's artifacts on local disk."""

    weights: Path
    spec: Path
    labels: Path
    settings: Path
    onnx: Path | None  # None: the version has no ONNX export (it is served with torch)

    @classmethod
    def in_dir(cls, folder: str | Path) -> "ModelFiles":
        folder = Path(folder)
        return cls(**{key: folder / name for key, name in ARTIFACT_KEYS.items()})

    @classmethod
    def from_artifacts(cls, artifacts: dict[str, str]) -> "ModelFiles":
        return cls(**{key: Path(artifacts[key]) if key in artifacts else None for key in ARTIFACT_KEYS})

    def as_artifacts(self) -> dict[str, str]:
        """The artifacts to log: every file, the ONNX export only where it was written."""
        paths = {key: getattr(self, key) for key in ARTIFACT_KEYS}
        return {key: str(path) for key, path in paths.items()
                if key not in OPTIONAL_ARTIFACTS or (path is not None and path.is_file())}

    def digest(self) -> str:
        """sha256 over every artifact's name and content (what a download must give back byte for byte)."""
        manifest = hashlib.sha256()
        for key in sorted(ARTIFACT_KEYS):
            path = getattr(self, key)
            if path is None or (key in OPTIONAL_ARTIFACTS and not path.is_file()):
                continue
            content = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    content.update(block)
            manifest.update(f"{key} {content.hexdigest()}\n".encode())
        return manifest.hexdigest()

    def read_spec(self) -> ModelSpec:
        try:
            return ModelSpec.model_validate_json(self.spec.read_text())
        except ValidationError as error:
            raise SpecError(describe_validation_error(error, f"model spec in {self.spec}")) from None

    def read_labels(self) -> list[str]:
        return validate_labels(json.loads(self.labels.read_text()))

    def read_settings(self, task: str) -> TaskSettings:
        return build_settings(task, json.loads(self.settings.read_text()))


def write_metadata(files: ModelFiles, spec: ModelSpec, labels: list[str], settings: TaskSettings) -> None:
    """Write spec.json, labels.json and settings.json."""
    files.spec.write_text(spec.model_dump_json(indent=2) + "\n")
    files.labels.write_text(json.dumps(labels, indent=2) + "\n")
    files.settings.write_text(settings.model_dump_json(indent=2) + "\n")
