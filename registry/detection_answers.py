"""A detector's answer for one image in the cloud's form (SPEC section 3): boxes normalised to [0, 1] by the image's
size, with the label and score; for instance segmentation, each object's polygon (at most
max_number_of_polygon_points points) and, with export_as_image, its mask as a base64 image of image_type."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from registry.polygons import mask_polygons
from registry.settings import DetectionSettings, SegmentationSettings

PIL_FORMATS = {"JPG": "JPEG", "PNG": "PNG", "BMP": "BMP"}


class Box(BaseModel):
    """A box's corners, normalised: (topX, topY) the top-left, (bottomX, bottomY) the bottom-right."""

    model_config = ConfigDict(extra="forbid")

    topX: float = Field(ge=0.0, le=1.0)
    topY: float = Field(ge=0.0, le=1.0)
    bottomX: float = Field(ge=0.0, le=1.0)
    bottomY: float = Field(ge=0.0, le=1.0)


class DetectedObject(BaseModel):
    """One detection: its box, label and score; for instance segmentation its outline (one ring per part, flat
    normalised x, y pairs) and, when asked for, its mask as a base64 image."""

    model_config = ConfigDict(extra="forbid")

    box: Box
    label: str
    score: float = Field(ge=0.0, le=1.0)
    polygon: list[list[float]] | None = None
    mask: str | None = Field(None, description="base64 image (settings.image_type) of the object's mask")


class DetectionAnswer(BaseModel):
    """The detections of one image, highest score first."""

    model_config = ConfigDict(extra="forbid")

    boxes: list[DetectedObject]


@dataclass(frozen=True)
class RawDetections:
    """A detector's output for one image, in pixels of that image: boxes (x0, y0, x1, y1), scores, classes from 1,
    and for segmentation each object's mask of pixel scores [N, H, W]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: np.ndarray | None = None


def mask_image(mask: np.ndarray, image_type: str) -> str:
    """A binary mask as a base64 image: 255 on the object, 0 elsewhere."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(buffer, PIL_FORMATS[image_type])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def detection_answer(raw: RawDetections, labels: list[str], width: int, height: int,
                     settings: DetectionSettings) -> DetectionAnswer:
    """The answer for an image of `width` x `height` pixels."""
    order = np.argsort(-raw.scores, kind="stable")
    scale = np.array([width, height, width, height], dtype=np.float64)
    segmentation = isinstance(settings, SegmentationSettings) and raw.masks is not None
    objects = []
    for index in order:
        if raw.classes[index] < 1:  # the background slot, which a RetinaNet (no background class) may score
            continue
        x0, y0, x1, y1 = np.clip(raw.boxes[index].astype(np.float64) / scale, 0.0, 1.0).tolist()
        found = DetectedObject(box=Box(topX=x0, topY=y0, bottomX=x1, bottomY=y1),
                               label=labels[int(raw.classes[index]) - 1],
                               score=float(np.clip(raw.scores[index], 0.0, 1.0)))
        if segmentation:
            mask = raw.masks[index] > settings.mask_pixel_score_threshold
            found.polygon = [list(ring) for ring in mask_polygons(mask, settings.max_number_of_polygon_points)]
            if settings.export_as_image:
                found.mask = mask_image(mask, settings.image_type)
        objects.append(found)
    return DetectionAnswer(boxes=objects)
