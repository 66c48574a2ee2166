"""Object detection and instance segmentation labels in the cloud's JSONL format, one image per line:

    {"image_url": "images/1.png", "image_details": {"format": "png", "width": 640, "height": 480},
     "label": [{"label": "circle", "topX": 0.1, "topY": 0.2, "bottomX": 0.3, "bottomY": 0.4, "isCrowd": 0,
                "polygon": [[0.1, 0.2, 0.3, 0.2, 0.2, 0.4]]}]}

Coordinates are normalised to [0, 1]. The documentation's own spellings are accepted: numbers and booleans as
strings (`"0.5"`, `"1"`, `"true"`), sizes with a unit (`"2230px"`), one label object instead of a list. An object
needs a box or a polygon (a box is then the polygon's bounds); instance segmentation needs a polygon for every object
that is not a crowd. A malformed line is refused naming its number and the field."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.errors import LanternError, describe_validation_error
from registry.settings import DetectionTask

PIXELS = re.compile(r"\s*([0-9]+)\s*(?:px)?\s*", re.IGNORECASE)


def _pixels(value: Any) -> Any:
    """`640`, `"640"` or `"640px"` as a number of pixels (anything else is left for the type check to refuse)."""
    if isinstance(value, str):
        match = PIXELS.fullmatch(value)
        return int(match.group(1)) if match else value
    return value


Coordinate = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Pixels = Annotated[int, BeforeValidator(_pixels), Field(ge=1)]


class ImageDetails(BaseModel):
    """What the line says of its image (checked against the file when it is read)."""

    model_config = ConfigDict(extra="forbid")

    format: str | None = None
    width: Pixels | None = None
    height: Pixels | None = None


class ObjectLabel(BaseModel):
    """One object: its class, its box and/or polygons (normalised), and whether it is a crowd."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    label: str = Field(min_length=1)
    top_x: Coordinate | None = Field(None, alias="topX")
    top_y: Coordinate | None = Field(None, alias="topY")
    bottom_x: Coordinate | None = Field(None, alias="bottomX")
    bottom_y: Coordinate | None = Field(None, alias="bottomY")
    is_crowd: bool = Field(False, alias="isCrowd")
    polygon: list[list[Coordinate]] | None = None

    @field_validator("polygon")
    @classmethod
    def _points(cls, polygons: list[list[float]] | None) -> list[list[float]] | None:
        for ring in polygons or []:
            if len(ring) % 2 or len(ring) < 6:
                raise ValueError(f"a polygon is a flat list x1, y1, x2, y2, ... of at least 3 points; one has "
                                 f"{len(ring)} numbers")
        return polygons

    @model_validator(mode="after")
    def _box_or_polygon(self) -> ObjectLabel:
        corners = (self.top_x, self.top_y, self.bottom_x, self.bottom_y)
        given = [c is not None for c in corners]
        if any(given) and not all(given):
            raise ValueError("a box needs all of topX, topY, bottomX and bottomY")
        if all(given):
            if not (self.top_x < self.bottom_x and self.top_y < self.bottom_y):  # type: ignore[operator]
                raise ValueError("a box needs topX < bottomX and topY < bottomY")
        elif not self.polygon:
            raise ValueError("an object needs a box (topX, topY, bottomX, bottomY) or a polygon")
        return self

    def box(self) -> tuple[float, float, float, float]:
        """The box as given, else its polygons' bounds."""
        if self.top_x is not None:
            return (self.top_x, self.top_y, self.bottom_x, self.bottom_y)  # type: ignore[return-value]
        xs = [x for ring in self.polygon or [] for x in ring[0::2]]
        ys = [y for ring in self.polygon or [] for y in ring[1::2]]
        return (min(xs), min(ys), max(xs), max(ys))


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value


class DetectionLine(BaseModel):
    """One line of the index: an image and its objects (none is a valid answer: an image of background only)."""

    model_config = ConfigDict(extra="forbid")

    image_url: str = Field(min_length=1)
    image_details: ImageDetails | None = None
    label: Annotated[list[ObjectLabel], BeforeValidator(_one_or_many)]


@dataclass(frozen=True)
class LabelledObject:
    """One object of an image, normalised: `box` is (x0, y0, x1, y1), `polygons` flat lists x1, y1, x2, y2, ..."""

    label: str
    box: tuple[float, float, float, float]
    is_crowd: bool = False
    polygons: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class DetectionExample:
    """One image on disk with its objects, and the size the line says it has (if it says)."""

    path: Path
    objects: tuple[LabelledObject, ...]
    width: int | None = None
    height: int | None = None


def read_detection_index(index: str | Path, task: DetectionTask) -> list[DetectionExample]:
    """Every line of a detection or instance-segmentation index; relative image paths are resolved against the
    index's folder, URLs refused (nothing is downloaded). A LanternError names the first bad line and field."""
    index = Path(index)
    examples = []
    for number, text in enumerate(index.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{index}:{number}"
        try:
            line = DetectionLine.model_validate(json.loads(text))
        except json.JSONDecodeError as error:
            raise LanternError(f"{where}: not JSON ({error})") from None
        except ValidationError as error:
            raise LanternError(f"{where}: {describe_validation_error(error, 'line', 'unknown field')}") from None
        examples.append(_example(line, index.parent, where, task))
    if not examples:
        raise LanternError(f"{index} holds no images")
    return examples


def _example(line: DetectionLine, folder: Path, where: str, task: DetectionTask) -> DetectionExample:
    url = line.image_url
    if "://" in url and not url.startswith("file://"):
        raise LanternError(f"{where}: image_url: only local image paths are accepted, got {url!r}")
    path = Path(url.removeprefix("file://"))
    objects = []
    for position, item in enumerate(line.label):
        if task == "instance_segmentation" and not item.polygon and not item.is_crowd:
            raise LanternError(f"{where}: label.{position}.polygon: instance segmentation needs a polygon for every "
                               "object that is not a crowd")
        polygons = tuple(tuple(ring) for ring in item.polygon or [])
        objects.append(LabelledObject(item.label, item.box(), item.is_crowd, polygons))
    details = line.image_details or ImageDetails()
    return DetectionExample(path if path.is_absolute() else folder / path, tuple(objects), details.width,
                            details.height)


def detection_labels(examples: list[DetectionExample]) -> list[str]:
    """The classes the examples use, sorted."""
    return sorted({obj.label for example in examples for obj in example.objects})
