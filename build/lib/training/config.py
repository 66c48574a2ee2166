"""What defines a training session (fixed once it starts) and what may change from one run of it to the next."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import LanternError, describe_validation_error
from registry.settings import Task
from registry.spec import ArchName
from training.schedule import DEFAULT_SCHEDULE, LRSchedule


class TrainConfig(BaseModel):
    """A session's identity: resuming or extending it must not change any of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(description="image folder, JSONL index, or shapes[:COUNT] for the synthetic set")
    val_data: str | None = Field(None, description="validation data; else a deterministic hold-out of `data`")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    arch: ArchName
    task: Task = "multiclass"
    image_size: int = Field(224, ge=16, le=1024)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = Field(0, ge=0)
    schedule: LRSchedule = DEFAULT_SCHEDULE
    augment: bool = True
    from_model: str | None = Field(None, description="models:/NAME/VERSION the weights start from")
    new_head: bool = Field(False, description="with from_model: a fresh classifier head for the data's labels")


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
