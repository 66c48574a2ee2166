"""Inference settings (settings.json) per task, with the defaults of SPEC.md section 1."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.errors import SpecError, describe_validation_error

Task = Literal["multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("multiclass", "multilabel")


DEFAULT_MULTILABEL_THRESHOLD = 0.5  # SPEC.md section 3: confidence_score_threshold_multilabel


class ClassificationSettings(BaseModel):
    """Image classification: resize the shorter side, center-crop, normalise."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    valid_resize_size: int = Field(256, ge=8, le=4096)
    valid_crop_size: int = Field(224, ge=8, le=4096)

    @model_validator(mode="after")
    def _crop_fits(self) -> "ClassificationSettings":
        if self.valid_crop_size > self.valid_resize_size:
            raise ValueError(
                f"valid_crop_size ({self.valid_crop_size}) must not exceed valid_resize_size ({self.valid_resize_size})"
            )
        return self


class MultilabelSettings(ClassificationSettings):
    """Multi-label classification adds the per-label score threshold."""

    confidence_score_threshold_multilabel: float = Field(DEFAULT_MULTILABEL_THRESHOLD, ge=0.0, le=1.0)


SETTINGS_SCHEMAS: dict[str, type[ClassificationSettings]] = {
    "multiclass": ClassificationSettings,
    "multilabel": MultilabelSettings,
}


def settings_schema(task: str) -> type[ClassificationSettings]:
    try:
        return SETTINGS_SCHEMAS[task]
    except KeyError:
        raise SpecError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}") from None


def build_settings(task: str, values: dict[str, Any] | None = None) -> ClassificationSettings:
    """Validate `values` (unset keys take the defaults) against the task's settings schema."""
    try:
        return settings_schema(task).model_validate(values or {})
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, f"settings for task {task!r}")) from None


def with_overrides(settings: ClassificationSettings, task: str, overrides: dict[str, Any]) -> ClassificationSettings:
    """A new settings object: `settings` with `overrides` applied, validated as a whole."""
    return build_settings(task, {**settings.model_dump(), **overrides})


def parse_assignments(pairs: list[str] | tuple[str, ...], option: str = "--set") -> dict[str, str]:
    """Parse `key=value` strings (from `option`) into a dict; the schema converts the values."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{option} expects key=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result
