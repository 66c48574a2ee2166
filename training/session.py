"""A training session directory: its metadata, its checkpoints (written atomically), listing and pruning.

Layout: `session.json` (config, labels, spec, status, MLflow run id), `metrics.csv`, and
`checkpoints/iteration-NNNNNNNN/` holding `weights.safetensors`, `spec.json`, `labels.json`, `settings.json`
(the registry's model files, so any checkpoint can be registered), `training_state.pt` (optimizer, grad scaler, RNG and
callback states; tensors and plain values only, loaded with `weights_only=True`) and `metrics.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from registry.errors import LanternError
from registry.model_files import CHECKPOINTS_DIR, ModelFiles, checkpoint_dir, write_metadata
from registry.settings import TaskSettings, is_detection
from registry.spec import ModelSpec
from training.config import TrainConfig

SESSION_FILE = "session.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "training_state.pt"
CSV_FILE = "metrics.csv"
Status = Literal["running", "stopped", "completed", "early_stopped", "failed"]


class SessionMeta(BaseModel):
    """What session.json holds."""

    model_config = ConfigDict(extra="forbid")

    config: TrainConfig
    labels: list[str]
    spec: ModelSpec
    settings: dict[str, Any]
    iterations: int = Field(ge=1, description="the iteration budget of the latest run")
    status: Status = "running"
    stop_reason: str | None = None
    from_version: str | None = Field(None, description="the resolved models:/NAME/VERSION the weights started from")
    mlflow_run_id: str | None = None
    created_at: str
    updated_at: str


class CheckpointInfo(BaseModel):
    """One checkpoint as listed: its iteration, epoch, metrics and where it lies."""

    iteration: int
    epoch: int
    metrics: dict[str, float]
    created_at: str
    reason: str = "interval"
    path: Path


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def selection_metric(task: str) -> str:
    """The validation metric that ranks checkpoints ('best'): a detector's mAP@[.5:.95], a multi-label classifier's
    micro F1, a multi-class classifier's accuracy."""
    if is_detection(task):
        return "val_map"
    return "val_f1" if task == "multilabel" else "val_accuracy"


class Session:
    """A session directory on disk."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta_path = self.dir / SESSION_FILE
        self.csv_path = self.dir / CSV_FILE
        self._lock = FileLock(str(self.dir / ".session.lock"))

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def lock(self) -> None:
        """Take the session for this process; a second trainer on the same directory is refused."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise LanternError(f"session {self.dir} is being trained by another process") from None

    def unlock(self) -> None:
        self._lock.release()

    def read_meta(self) -> SessionMeta:
        if not self.exists():
            raise LanternError(f"{self.dir} is not a training session (no {SESSION_FILE})")
        return SessionMeta.model_validate_json(self.meta_path.read_text())

    def write_meta(self, meta: SessionMeta) -> None:
        meta.updated_at = now()
        tmp = self.meta_path.with_suffix(".json.tmp")
        tmp.write_text(meta.model_dump_json(indent=2) + "\n")
        os.replace(tmp, self.meta_path)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first."""
        root = self.dir / CHECKPOINTS_DIR
        infos = []
        for folder in sorted(root.glob("iteration-*")) if root.is_dir() else []:
            metrics_file = folder / METRICS_FILE
            if metrics_file.is_file():
                infos.append(CheckpointInfo.model_validate({**json.loads(metrics_file.read_text()), "path": folder}))
        return infos

    def latest(self) -> CheckpointInfo | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def best(self, metric: str) -> CheckpointInfo | None:
        """The checkpoint with the highest `metric` (the latest among equals)."""
        ranked = [c for c in self.checkpoints() if metric in c.metrics]
        return max(ranked, key=lambda c: (c.metrics[metric], c.iteration)) if ranked else None

    def get(self, iteration: int) -> CheckpointInfo:
        for info in self.checkpoints():
            if info.iteration == iteration:
                return info
        available = ", ".join(str(c.iteration) for c in self.checkpoints()) or "none"
        raise LanternError(f"session {self.dir} has no checkpoint at iteration {iteration}; it has: {available}")

    def save_checkpoint(self, iteration: int, epoch: int, model: nn.Module, spec: ModelSpec, labels: list[str],
                        settings: TaskSettings, training_state: dict[str, Any], metrics: dict[str, float],
                        reason: str) -> Path:
        """Write a checkpoint to a temporary folder, then move it into place (a crash never leaves half of one)."""
        target = checkpoint_dir(self.dir, iteration)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".staging-{iteration:08d}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        files = ModelFiles.in_dir(staging)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(files.weights))
        write_metadata(files, spec, labels, settings)
        torch.save(training_state, staging / STATE_FILE)
        info = {"iteration": iteration, "epoch": epoch, "metrics": metrics, "created_at": now(), "reason": reason}
        (staging / METRICS_FILE).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return target

    def load_training_state(self, info: CheckpointInfo) -> dict[str, Any]:
        return torch.load(info.path / STATE_FILE, map_location="cpu", weights_only=True)

    def prune(self, keep_last: int | None = None, below: int | None = None, keep_best: bool = True,
              metric: str = "val_accuracy") -> list[CheckpointInfo]:
        """Remove checkpoints: all but the `keep_last` newest, and/or those before iteration `below`.

        The newest checkpoint (where a resume starts) is always kept, and the best by `metric` unless `keep_best`
        is False. Returns the removed ones."""
        if keep_last is not None and keep_last < 1:
            raise LanternError("--keep-last must be at least 1: the newest checkpoint is where a resume starts")
        checkpoints = self.checkpoints()
        if not checkpoints:
            return []
        protected = {checkpoints[-1].iteration}
        best = self.best(metric)
        if keep_best and best is not None:
            protected.add(best.iteration)
        doomed = []
        for position, info in enumerate(checkpoints):
            too_old = keep_last is not None and position < len(checkpoints) - keep_last
            too_early = below is not None and info.iteration < below
            if (too_old or too_early) and info.iteration not in protected:
                doomed.append(info)
        for info in doomed:
            trash = info.path.with_name(f".removing-{info.path.name}-{time.time_ns()}")
            os.replace(info.path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return doomed
