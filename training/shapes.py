"""Synthetic shapes dataset: coloured shapes on cluttered, textured backgrounds, with object masks.

Each image is generated from its own seed (dataset seed, image index), so a dataset is deterministic and an image
does not depend on how many others were generated. On disk a dataset is a folder with `images/`, `masks/`,
`labels.txt` and `index.jsonl`; every index line holds `image_url` and `label` (a class name, or a list of names for
the multi-label variant) and `mask_url`. A mask is a label map: 0 is background, `k + 1` marks pixels of class `k`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import BaseModel, ConfigDict, Field

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
INDEX_FILE = "index.jsonl"
LABELS_FILE = "labels.txt"


class ShapesConfig(BaseModel):
    """Parameters of a generated shapes dataset."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(300, ge=1, le=1_000_000)
    image_size: int = Field(64, ge=32, le=1024)
    seed: int = 0
    multilabel: bool = False
    max_shapes: int = Field(3, ge=1, le=3, description="most shapes per image in the multi-label variant")


@dataclass(frozen=True)
class ShapeSample:
    """One generated image with its labels and label-map mask."""

    image: Image.Image
    mask: Image.Image
    labels: tuple[str, ...]


def random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> tuple:
    hue = rng.uniform(0, 1)
    sat = rng.uniform(*saturation)
    val = rng.uniform(*value)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return tuple(int(round(255 * c)) for c in rgb)


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A textured, cluttered background: a colour gradient, smoothed noise, stripes and thin random strokes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0 = np.array(random_colour(rng, (0.1, 0.5), (0.3, 0.8)), np.float32)
    c1 = np.array(random_colour(rng, (0.1, 0.5), (0.3, 0.8)), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    img = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    period = rng.uniform(4, 12)
    stripe_angle = rng.uniform(0, math.pi)
    stripes = np.sin((np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) * size * 2 * math.pi / period)
    img += 18.0 * stripes[..., None]
    noise = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    img += (np.asarray(noise, np.float32) - 128.0) * 0.6
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        draw.line((x0, y0, x1, y1), fill=random_colour(rng, (0.0, 0.4), (0.2, 0.9)), width=1)
    return canvas


def shape_polygon(kind: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]] | None:
    if kind == "circle":
        return None
    corners = {"square": 4, "triangle": 3}[kind]
    r = radius * (1.0 if kind == "square" else 1.15)
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / corners), cy + r * math.sin(rotation + 2 * math.pi * k / corners))
        for k in range(corners)
    ]


def draw_shape(image: Image.Image, mask: Image.Image, kind: str, class_index: int, cx: float, cy: float,
                radius: float, rotation: float, colour: tuple) -> None:
    draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    poly = shape_polygon(kind, cx, cy, radius, rotation)
    if poly is None:
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        draw.ellipse(box, fill=colour)
        mdraw.ellipse(box, fill=class_index + 1)
    else:
        draw.polygon(poly, fill=colour)
        mdraw.polygon(poly, fill=class_index + 1)


def make_sample(config: ShapesConfig, index: int) -> ShapeSample:
    """Generate image `index` of the dataset described by `config`."""
    rng = np.random.default_rng([config.seed, index])
    size = config.image_size
    image = background(rng, size)
    mask = Image.new("L", (size, size), 0)
    n_shapes = int(rng.integers(1, config.max_shapes + 1)) if config.multilabel else 1
    kinds = [SHAPE_CLASSES[int(k)] for k in rng.choice(len(SHAPE_CLASSES), n_shapes, replace=False)]
    placed: list[tuple[float, float, float]] = []
    for kind in kinds:
        max_radius = size * (0.3 if n_shapes == 1 else 0.2)
        for _attempt in range(50):
            radius = rng.uniform(size * 0.14, max_radius)
            cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
            if all(math.hypot(cx - px, cy - py) > (radius + pr) * 1.15 for px, py, pr in placed):
                break
        placed.append((cx, cy, radius))
        colour = random_colour(rng, (0.6, 1.0), (0.5, 1.0))
        draw_shape(image, mask, kind, SHAPE_CLASSES.index(kind), cx, cy, radius, rng.uniform(0, 2 * math.pi), colour)
    labels = tuple(sorted(kinds, key=SHAPE_CLASSES.index))
    return ShapeSample(image=image, mask=mask, labels=labels)


def write_dataset(out_dir: str | Path, config: BaseModel, count: int,
                  draw: Callable[[int, str, str], tuple[Image.Image, Image.Image, str]]) -> Path:
    """Write `count` drawn images, their masks, labels.txt, the index and the config (dataset.json) to `out_dir`;
    `draw(i, image_url, mask_url)` gives image i, its mask and its index line. Returns the index's path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / LABELS_FILE).write_text("\n".join(SHAPE_CLASSES) + "\n")
    lines = []
    for i in range(count):
        image_url, mask_url = f"images/{i:06d}.png", f"masks/{i:06d}.png"
        image, mask, line = draw(i, image_url, mask_url)
        image.save(out / image_url)
        mask.save(out / mask_url)
        lines.append(line)
    index = out / INDEX_FILE
    index.write_text("\n".join(lines) + "\n")
    (out / "dataset.json").write_text(config.model_dump_json(indent=2) + "\n")
    return index


def write_shapes_dataset(out_dir: str | Path, config: ShapesConfig) -> Path:
    """Write the dataset to `out_dir`; returns the path of its `index.jsonl`."""

    def draw(i: int, image_url: str, mask_url: str) -> tuple[Image.Image, Image.Image, str]:
        sample = make_sample(config, i)
        label: str | list[str] = list(sample.labels) if config.multilabel else sample.labels[0]
        return sample.image, sample.mask, json.dumps({"image_url": image_url, "label": label, "mask_url": mask_url})

    return write_dataset(out_dir, config, config.count, draw)
