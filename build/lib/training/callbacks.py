"""Callbacks on the training loop's events, the state they see, and the built-in ones.

Events, in order: fit_start, then per iteration epoch_start (at an epoch's first batch, and at the first batch of
a resumed run), batch_start, batch_end, epoch_end (after an epoch's last batch), then validation_start/validation_end
and checkpoint at checkpoint iterations, report at report iterations; fit_end last. A callback that keeps state
across a resume returns it from `state_dict()` (plain Python values); it is saved in every checkpoint.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from training.schedule import LRSchedule

ValidationReason = Literal["interval", "stop", "end"]


@dataclass
class TrainState:
    """What the loop knows; callbacks read it and may call `request_stop`."""

    model: nn.Module
    optimizer: Optimizer
    total: int
    steps_per_epoch: int
    base_lr: float
    start_iteration: int = 0
    iteration: int = 0  # updates done so far
    lr: float = 0.0
    loss: float | None = None  # of the latest batch
    metrics: dict[str, float] = field(default_factory=dict)  # latest train_* and val_* values
    validation_reason: ValidationReason | None = None
    stop_reason: str | None = None
    early_stopped: bool = False

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (0-based): a pass over the training data."""
        return self.iteration // self.steps_per_epoch

    @property
    def resumed(self) -> bool:
        return self.start_iteration > 0

    def request_stop(self, reason: str, early: bool = False) -> None:
        """Stop after the current batch (a checkpoint is written first)."""
        if self.stop_reason is None:
            self.stop_reason, self.early_stopped = reason, early


class Callback:
    """Base class: override the events you need."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_fit_start(self, state: TrainState) -> None: ...
    def on_fit_end(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_batch_start(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_validation_start(self, state: TrainState) -> None: ...
    def on_validation_end(self, state: TrainState) -> None: ...
    def on_checkpoint(self, state: TrainState, path: Path) -> None: ...
    def on_report(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackList:
    """Dispatches each event to every callback in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)
        names = [c.name for c in self.callbacks]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"callback names must be unique, repeated: {sorted(duplicates)}")

    def fire(self, event: str, state: TrainState, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, f"on_{event}")(state, *args)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {c.name: c.state_dict() for c in self.callbacks}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for callback in self.callbacks:
            if callback.name in states:
                callback.load_state_dict(states[callback.name])


class LRScheduler(Callback):
    """Sets each parameter group's learning rate from a segment schedule before every batch."""

    def __init__(self, schedule: LRSchedule) -> None:
        self.schedule = schedule

    def on_batch_start(self, state: TrainState) -> None:
        state.lr = state.base_lr * self.schedule.factor(state.iteration, state.total)
        for group in state.optimizer.param_groups:
            group["lr"] = state.lr


class EarlyStopping(Callback):
    """Stops when `monitor` reaches `target`, or after `patience` validations without an improvement of `min_delta`.

    Only the validations at checkpoint intervals count (not the one written when a run is stopped), so a stopped and
    resumed run decides exactly as an uninterrupted one."""

    def __init__(self, monitor: str = "val_accuracy", mode: Literal["max", "min"] = "max",
                 target: float | None = None, patience: int | None = None, min_delta: float = 0.0) -> None:
        if target is None and patience is None:
            raise ValueError("early stopping needs a target, a patience, or both")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 validations, got {patience}")
        self.monitor, self.mode, self.target, self.patience, self.min_delta = monitor, mode, target, patience, min_delta
        self.best: float | None = None
        self.bad_validations = 0

    def _better(self, value: float, reference: float, delta: float) -> bool:
        return value > reference + delta if self.mode == "max" else value < reference - delta

    def on_validation_end(self, state: TrainState) -> None:
        if state.validation_reason != "interval":
            return
        if self.monitor not in state.metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, but validation gives {sorted(state.metrics)}")
        value = state.metrics[self.monitor]
        if self.best is None or self._better(value, self.best, self.min_delta):
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        if self.target is not None and not self._better(self.target, value, 0.0):
            state.request_stop(f"{self.monitor} {value:.4g} reached the target {self.target:g}", early=True)
        elif self.patience is not None and self.bad_validations >= self.patience:
            state.request_stop(f"{self.monitor} did not improve for {self.patience} validations "
                               f"(best {self.best:.4g})", early=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_validations = state.get("best"), int(state.get("bad_validations", 0))


CSV_COLUMNS = ("iteration", "epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1")


class CSVLogger(Callback):
    """Appends a row per report (validation columns filled where a validation ran at that iteration).

    On a resumed run, rows after the resumed iteration (written before a hard kill) are dropped first."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._validated_at: int | None = None

    def on_fit_start(self, state: TrainState) -> None:
        rows: list[dict[str, str]] = []
        if self.path.exists():
            with self.path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["iteration"]) <= state.iteration]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def on_validation_end(self, state: TrainState) -> None:
        self._validated_at = state.iteration

    def on_report(self, state: TrainState) -> None:
        row: dict[str, Any] = {"iteration": state.iteration, "epoch": state.epoch, "lr": f"{state.lr:.6g}"}
        for key, value in state.metrics.items():
            if key.startswith("train_") or self._validated_at == state.iteration:
                row[key] = f"{value:.6g}"
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore").writerow(row)
