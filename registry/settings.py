"""Inference settings (settings.json) per task, with the defaults of SPEC.md section 1."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from registry.errors import SpecError, describe_validation_error

CLASSIFICATION_TASKS: tuple[str, ...] = ("multiclass", "multilabel")
DetectionTask = Literal["object_detection", "instance_segmentation"]
DETECTION_TASKS: tuple[str, ...] = ("object_detection", "instance_segmentation")
Task = Literal["multiclass", "multilabel", "object_detection", "instance_segmentation"]
TASKS: tuple[str, ...] = CLASSIFICATION_TASKS + DETECTION_TASKS


def is_detection(task: str) -> bool:
    """Whether `task` answers boxes (object detection, instance segmentation) rather than classes."""
    return task in DETECTION_TASKS


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


GRID = re.compile(r"\s*\(?\s*([0-9]+)\s*[,x]\s*([0-9]+)\s*\)?\s*", re.IGNORECASE)


def _grid(value: Any) -> Any:
    """A tile grid as the cloud writes it, `"(3, 2)"` (also `"3x2"` or `[3, 2]`): columns, rows."""
    if isinstance(value, str):
        match = GRID.fullmatch(value)
        return [int(match.group(1)), int(match.group(2))] if match else value
    return value


TileGrid = Annotated[tuple[Annotated[int, Field(ge=1, le=16)], Annotated[int, Field(ge=1, le=16)]],
                     BeforeValidator(_grid)]


class DetectionSettings(BaseModel):
    """Object detection (two-stage and RetinaNet style): the image resized between min_size and max_size, detections
    kept above box_score_thresh, merged by NMS at nms_iou_thresh, at most box_detections_per_img; with
    tile_grid_size, the image is also cut into that many overlapping tiles (tile_overlap_ratio) whose detections
    are merged with the whole image's by NMS at tile_predictions_nms_thresh, for small objects."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_size: int = Field(600, ge=32, le=4096)
    max_size: int = Field(1333, ge=32, le=8192)
    box_score_thresh: float = Field(0.3, ge=0.0, le=1.0)
    nms_iou_thresh: float = Field(0.5, ge=0.0, le=1.0)
    box_detections_per_img: int = Field(100, ge=1, le=1000)
    tile_grid_size: TileGrid | None = None
    tile_overlap_ratio: float = Field(0.25, ge=0.0, lt=1.0)
    tile_predictions_nms_thresh: float = Field(0.25, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sizes_fit(self) -> "DetectionSettings":
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class SegmentationSettings(DetectionSettings):
    """Instance segmentation adds how masks become answers: the pixel score a mask keeps, the most points of a
    polygon, and whether (and as what) the mask is also sent as an image."""

    mask_pixel_score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_number_of_polygon_points: int = Field(100, ge=3, le=10_000)
    export_as_image: bool = False
    image_type: Literal["JPG", "PNG", "BMP"] = "JPG"


TaskSettings = ClassificationSettings | DetectionSettings

SETTINGS_SCHEMAS: dict[str, type[ClassificationSettings] | type[DetectionSettings]] = {
    "multiclass": ClassificationSettings,
    "multilabel": MultilabelSettings,
    "object_detection": DetectionSettings,
    "instance_segmentation": SegmentationSettings,
}


def settings_schema(task: str) -> type[ClassificationSettings] | type[DetectionSettings]:
    try:
        return SETTINGS_SCHEMAS[task]
    except KeyError:
        raise SpecError(f"unknown task {task!r}; accepted: {', '.join(SETTINGS_SCHEMAS)}") from None


def build_settings(task: str, values: dict[str, Any] | None = None) -> TaskSettings:
    """Validate `values` (unset keys take the defaults) against the task's settings schema."""
    try:
        return settings_schema(task).model_validate(values or {})
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, f"settings for task {task!r}")) from None


def with_overrides(settings: TaskSettings, task: str, overrides: dict[str, Any]) -> TaskSettings:
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
