"""Synthetic shapes for object detection and instance segmentation: several shapes per image (some small, some
touching or partly hidden by a later one) on the cluttered backgrounds of shapes.py, each object's box and polygon
taken from the pixels left visible of it.

On disk: `images/`, `masks/` (an instance map: 0 is background, `k + 1` the pixels of object `k` of the line),
`labels.txt`, and `index.jsonl` in the cloud's format (training/detection_index.py), with polygons for instance
segmentation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from registry.polygons import mask_polygons
from registry.settings import DetectionTask
from training.detection_index import LabelledObject
from training.shapes import SHAPE_CLASSES, background, draw_shape, random_colour, write_dataset

MIN_VISIBLE_PIXELS = 12  # an object hidden by later ones down to fewer pixels is not labelled
SMALL_SHARE = 0.3  # of the objects drawn small (a radius of 3-6 % of the image)
TOUCHING_SHARE = 0.3  # of the objects (after the first) placed against an earlier one


class InstanceShapesConfig(BaseModel):
    """Parameters of a generated detection or instance-segmentation shapes dataset."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(200, ge=1, le=1_000_000)
    image_size: int = Field(128, ge=64, le=2048)
    seed: int = 0
    max_objects: int = Field(6, ge=1, le=32)
    task: DetectionTask = "object_detection"


@dataclass(frozen=True)
class InstanceSample:
    """One generated image, its instance map and its labelled objects (normalised boxes and polygons)."""

    image: Image.Image
    instances: Image.Image
    objects: tuple[LabelledObject, ...]


def _place(rng: np.random.Generator, size: int, radius: float,
           placed: list[tuple[float, float, float]]) -> tuple[float, float]:
    """A centre for a shape of `radius`: against an earlier shape (touching it) for some, else apart from all."""
    inside = (radius + 1, size - radius - 1)
    if placed and rng.random() < TOUCHING_SHARE:
        px, py, pr = placed[int(rng.integers(len(placed)))]
        angle = rng.uniform(0, 2 * math.pi)
        distance = (pr + radius) * rng.uniform(0.85, 1.0)
        cx, cy = px + distance * math.cos(angle), py + distance * math.sin(angle)
        if inside[0] <= cx <= inside[1] and inside[0] <= cy <= inside[1]:
            return cx, cy
    for _attempt in range(50):
        cx, cy = rng.uniform(*inside, 2)
        if all(math.hypot(cx - px, cy - py) > (radius + pr) * 1.1 for px, py, pr in placed):
            break
    return float(cx), float(cy)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The tight box of `mask`'s pixels, normalised (x0, y0, x1, y1)."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    return (round(float(xs.min()) / width, 6), round(float(ys.min()) / height, 6),
            round(float(xs.max() + 1) / width, 6), round(float(ys.max() + 1) / height, 6))


def make_instance_sample(config: InstanceShapesConfig, index: int) -> InstanceSample:
    """Image `index` of the dataset described by `config` (its own seed: the same whatever the count)."""
    rng = np.random.default_rng([config.seed, index, 1])
    size = config.image_size
    image = background(rng, size)
    instances = Image.new("L", (size, size), 0)
    kinds: list[str] = []
    placed: list[tuple[float, float, float]] = []
    for number in range(int(rng.integers(1, config.max_objects + 1))):
        kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        small = rng.random() < SMALL_SHARE
        radius = size * (rng.uniform(0.03, 0.06) if small else rng.uniform(0.08, 0.16))
        cx, cy = _place(rng, size, radius, placed)
        placed.append((cx, cy, radius))
        kinds.append(kind)
        colour = random_colour(rng, (0.6, 1.0), (0.5, 1.0))
        draw_shape(image, instances, kind, number, cx, cy, radius, rng.uniform(0, 2 * math.pi), colour)
    drawn = np.asarray(instances)
    kept = np.zeros_like(drawn)  # the labelled objects numbered 1, 2, ... in the order of the line
    objects = []
    for number, kind in enumerate(kinds):
        mask = drawn == number + 1
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        polygons = mask_polygons(mask) if config.task == "instance_segmentation" else ()
        objects.append(LabelledObject(kind, mask_box(mask), False, polygons))
        kept[mask] = len(objects)
    return InstanceSample(image, Image.fromarray(kept), tuple(objects))


def index_line(image_url: str, size: int, objects: tuple[LabelledObject, ...]) -> str:
    """One line of the cloud's JSONL index for an image and its objects."""
    labels = []
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        item: dict = {"label": obj.label, "topX": x0, "topY": y0, "bottomX": x1, "bottomY": y1,
                      "isCrowd": int(obj.is_crowd)}
        if obj.polygons:
            item["polygon"] = [list(ring) for ring in obj.polygons]
        labels.append(item)
    return json.dumps({"image_url": image_url, "image_details": {"format": "png", "width": size, "height": size},
                       "label": labels})


def write_instance_shapes_dataset(out_dir: str | Path, config: InstanceShapesConfig) -> Path:
    """Write the dataset to `out_dir`; returns the path of its `index.jsonl`."""

    def draw(i: int, image_url: str, mask_url: str) -> tuple[Image.Image, Image.Image, str]:
        sample = make_instance_sample(config, i)
        return sample.image, sample.instances, index_line(image_url, config.image_size, sample.objects)

    return write_dataset(out_dir, config, config.count, draw)
