"""Resolving `models:/NAME/VERSION` and `models:/NAME@ALIAS` to a registered version and a loaded model bundle."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import yaml
from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry.detectors import apply_detection_settings
from registry.errors import LanternError, ModelNotFoundError
from registry.model_files import (
    ARTIFACT_KEYS,
    OPTIONAL_ARTIFACTS,
    TAG_DERIVED_FROM,
    TAG_FILES_DIGEST,
    TAG_PARITY,
    ModelFiles,
)
from registry.references import ModelRef, parse_model_ref, version_uri
from registry.settings import DetectionSettings, TaskSettings
from registry.spec import ModelSpec, build_module
from registry.store import lantern_home, open_client

if TYPE_CHECKING:
    from torch import nn

COMPLETE_MARKER = ".lantern-complete"


def resolve_version(client: MlflowClient, ref: ModelRef | str) -> ModelVersion:
    """The registered version `ref` points at; a clear error names what exists when it points nowhere."""
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    try:
        model = client.get_registered_model(ref.name)
    except MlflowException:
        raise ModelNotFoundError(f"no registered model named {ref.name!r}") from None
    try:
        if ref.version is not None:
            return client.get_model_version(ref.name, str(ref.version))
        if ref.alias is not None:
            return client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException:
        aliases = ", ".join(f"@{a}" for a in sorted(model.aliases)) or "none"
        raise ModelNotFoundError(
            f"{ref.uri} does not exist; {ref.name} has {len(list_versions(client, ref.name))} version(s), aliases: {aliases}"
        ) from None
    versions = list_versions(client, ref.name)
    if not versions:
        raise ModelNotFoundError(f"registered model {ref.name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


def list_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every registered version of `name`."""
    return list(client.search_model_versions(f"name='{name}'"))


@dataclass(frozen=True)
class DownloadedVersion:
    """A registered version's files on local disk."""

    version: ModelVersion
    files: ModelFiles
    model_dir: Path

    @property
    def uri(self) -> str:
        return version_uri(self.version.name, self.version.version)


def _cache_dir(client: MlflowClient, version: ModelVersion) -> Path:
    store = hashlib.sha256(client.tracking_uri.encode()).hexdigest()[:12]
    return lantern_home() / "models" / store / version.name / str(version.version)


def _files_from_mlmodel(model_dir: Path) -> ModelFiles:
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    missing = [key for key in ARTIFACT_KEYS if key not in artifacts and key not in OPTIONAL_ARTIFACTS]
    if missing:
        raise LanternError(f"{model_dir} is not a Lantern model: its MLmodel lacks artifacts {missing}")
    return ModelFiles.from_artifacts({key: str(model_dir / artifacts[key]["path"]) for key in ARTIFACT_KEYS
                                      if key in artifacts})


class DigestMismatch(LanternError):
    """A downloaded version's files are not the ones registered (damaged or replaced in the artifact store)."""


def _check_digest(version: ModelVersion, folder: Path, tracking_uri: str) -> None:
    expected = (version.tags or {}).get(TAG_FILES_DIGEST)
    if expected is None:
        return  # registered before versions carried their digest
    found = _files_from_mlmodel(folder).digest()
    if found != expected:
        raise DigestMismatch(f"the files of {version_uri(version.name, version.version)} downloaded from "
                             f"{tracking_uri} are not the ones registered (sha256 {found[:12]}..., registered "
                             f"{expected[:12]}...): the artifact store holds damaged or replaced files; nothing was "
                             "cached")


def download_version(client: MlflowClient, ref: ModelRef | str) -> DownloadedVersion:
    """Download a version's model folder into the local cache once (versions are immutable, so it is reused), checked
    against the digest of the files registered."""
    version = resolve_version(client, ref)
    target = _cache_dir(client, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=600):
        if not (target / COMPLETE_MARKER).exists():
            staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
            try:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version_uri(version.name, version.version), dst_path=str(staging),
                    tracking_uri=client.tracking_uri,
                )
                _check_digest(version, staging, client.tracking_uri)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            (staging / COMPLETE_MARKER).touch()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return DownloadedVersion(version, _files_from_mlmodel(target), target)


@dataclass
class ModelBundle:
    """A loaded registered version: the nn.Module (explanations; a detector's torch backend), the ONNX file (None
    for a detector registered without one), labels, settings and spec."""

    name: str
    version: int
    aliases: list[str]
    spec: ModelSpec
    labels: list[str]
    settings: TaskSettings
    module: nn.Module
    onnx_path: Path | None
    files: ModelFiles
    run_id: str | None
    onnx_max_abs_diff: float | None
    derived_from: str | None

    @property
    def uri(self) -> str:
        return version_uri(self.name, self.version)


def load_bundle(ref: ModelRef | str, tracking_uri: str | None = None, device: str = "cpu",
                client: MlflowClient | None = None) -> ModelBundle:
    """Resolve `ref`, download its files and rebuild its nn.Module with the registered weights on `device`."""
    return bundle_of(download_version(client or open_client(tracking_uri), ref), device)


def bundle_of(downloaded: DownloadedVersion, device: str = "cpu") -> ModelBundle:
    """A downloaded version's nn.Module rebuilt with its registered weights on `device`, with its files."""
    files, version = downloaded.files, downloaded.version
    from registry.checkpoint import fit_state_dict, load_state_dict  # torch: only commands that build a module

    spec = files.read_spec()
    module = build_module(spec)
    fit_state_dict(module, load_state_dict(files.weights))
    settings = files.read_settings(spec.task)
    if isinstance(settings, DetectionSettings):
        apply_detection_settings(module, settings)
    parity = version.tags.get(TAG_PARITY)
    return ModelBundle(
        name=version.name,
        version=int(version.version),
        aliases=list(version.aliases),
        spec=spec,
        labels=files.read_labels(),
        settings=settings,
        module=module.to(device).eval(),
        onnx_path=files.onnx,
        files=files,
        run_id=version.run_id,
        onnx_max_abs_diff=float(parity) if parity is not None else None,
        derived_from=version.tags.get(TAG_DERIVED_FROM),
    )
