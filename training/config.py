"""What defines a training session (fixed once it starts) and what may change from one run of it to the next."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.detectors import DETECTORS
from registry.errors import LanternError, describe_validation_error
from registry.settings import Task, is_detection
from registry.spec import ArchName, arch_task_problem
from training.schedule import DEFAULT_SCHEDULE, LRSchedule

CLASSIFIER_LR = 1e-3  # AdamW's
DETECTOR_LR = 0.02  # SGD with momentum's, as torchvision's detection references train
CLASSIFIER_IMAGE_SIZE = 224


class TrainConfig(BaseModel):
    """A session's identity: resuming or extending it must not change any of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(description="image folder, JSONL index, or shapes[:COUNT] for the synthetic set")
    val_data: str | None = Field(None, description="validation data; else a deterministic hold-out of `data`")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    arch: ArchName
    task: Task = "multiclass"
    image_size: int = Field(CLASSIFIER_IMAGE_SIZE, ge=16, le=1024,
                            description="a classifier's input side; a detector's shorter side (its min_size)")
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(CLASSIFIER_LR, gt=0, le=10, description="AdamW's for a classifier, SGD's for a detector")
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = Field(0, ge=0)
    schedule: LRSchedule = DEFAULT_SCHEDULE
    augment: bool = True
    from_model: str | None = Field(None, description="models:/NAME/VERSION the weights start from")
    new_head: bool = Field(False, description="with from_model: a fresh classifier head for the data's labels")

    @model_validator(mode="before")
    @classmethod
    def _detector_defaults(cls, values: Any) -> Any:
        """A detector's learning rate and image size default to its own (unless given)."""
        if isinstance(values, dict) and is_detection(str(values.get("task"))) and values.get("arch") in DETECTORS:
            values = {"lr": DETECTOR_LR, "image_size": DETECTORS[values["arch"]].min_size, **values}
        return values

    @model_validator(mode="after")
    def _arch_fits_task(self) -> "TrainConfig":
        problem = arch_task_problem(self.arch, self.task)
        if problem:
            raise ValueError(problem)
        return self


def build_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from `values`, with a readable error naming every bad field."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        raise LanternError(describe_validation_error(error, "training configuration")) from None


def merge_with_session(stored: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The stored config of a session, checked against explicitly `given` values (None means not given)."""
    stored_values = stored.model_dump()
    candidate = build_config({**stored_values, **{k: v for k, v in given.items() if v is not None}})
    changed = [
        f"{key}={getattr(candidate, key)!r} (the session has {getattr(stored, key)!r})"
        for key in TrainConfig.model_fields
        if getattr(candidate, key) != getattr(stored, key)
    ]
    if changed:
        raise LanternError(
            "this session was started with a different configuration: " + "; ".join(changed)
            + ". Leave these options out to resume it as it was, or use a new --session-dir."
        )
    return stored
