"""Labelled image datasets: a JSONL index (`image_url`, `label`) or an image folder, as torch datasets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from registry.errors import LanternError
from registry.images import ImageDecodeError, as_rgb, upright

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Example:
    """One labelled image on disk (`labels` has one entry for multi-class data)."""

    path: Path
    labels: tuple[str, ...]
    mask: Path | None = None


def read_index(index: str | Path) -> list[Example]:
    """Examples of a JSONL index; relative `image_url`/`mask_url` are resolved against the index's folder."""
    index = Path(index)
    examples = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            url, label = row["image_url"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LanternError(f"{index}:{number}: expected JSON with image_url and label ({error})") from None
        if "://" in url and not url.startswith("file://"):
            raise LanternError(f"{index}:{number}: only local image paths are accepted, got {url!r}")
        path = Path(url.removeprefix("file://"))
        labels = tuple(label) if isinstance(label, list) else (label,)
        mask = row.get("mask_url")
        examples.append(Example(path if path.is_absolute() else index.parent / path, labels,
                                (index.parent / mask) if mask else None))
    return examples


def read_image_folder(root: str | Path) -> list[Example]:
    """Examples of a folder with one sub-folder per class."""
    root = Path(root)
    return [
        Example(path, (class_dir.name,))
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def read_examples(source: str | Path) -> list[Example]:
    """Examples from a JSONL index file or an image folder (a folder holding `index.jsonl` uses the index)."""
    source = Path(source)
    if source.is_dir() and (source / "index.jsonl").is_file():
        source = source / "index.jsonl"
    if source.is_file():
        return read_index(source)
    if source.is_dir():
        return read_image_folder(source)
    raise LanternError(f"no dataset at {source}: give a JSONL index or a folder with one sub-folder per class")


def holdout_split(examples: list[Example], fraction: float, root: Path) -> tuple[list[Example], list[Example]]:
    """Split into (train, validation): the validation share is the `fraction` of examples whose path (relative to
    `root`) hashes lowest, so the split is deterministic and an image keeps its side when others are added."""
    if len(examples) < 2:
        raise LanternError(f"need at least 2 images to hold some out for validation, found {len(examples)}")

    def key(example: Example) -> str:
        try:
            name = example.path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            name = example.path.as_posix()
        return hashlib.sha1(name.encode()).hexdigest()

    count = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    held_out = {id(e) for e in sorted(examples, key=key)[:count]}
    return [e for e in examples if id(e) not in held_out], [e for e in examples if id(e) in held_out]


def label_set(examples: list[Example]) -> list[str]:
    """Sorted distinct labels of `examples`."""
    return sorted({label for example in examples for label in example.labels})


def load_uint8(path: Path) -> torch.Tensor:
    """An image file as a [3, H, W] uint8 tensor, its pixels read as serving reads them (registry/images.py): turned
    as its EXIF orientation says, and converted to 8-bit RGB."""
    with Image.open(path) as image:
        try:
            return pil_to_tensor(as_rgb(upright(image)))
        except ImageDecodeError as error:
            raise LanternError(f"{path}: {error}") from None


class ImageDataset(Dataset):
    """Examples as (image tensor, target) pairs: a class index for multi-class, a 0/1 vector for multi-label.

    `transform` receives a [3, H, W] uint8 tensor and must be deterministic: with `preload`, every image is decoded
    and transformed once, up front."""

    def __init__(self, examples: list[Example], labels: list[str], transform, multilabel: bool,
                 preload: bool = False) -> None:
        self.examples, self.transform, self.multilabel = examples, transform, multilabel
        self.index = {label: i for i, label in enumerate(labels)}
        unknown = sorted({label for e in examples for label in e.labels} - set(self.index))
        if unknown:
            raise LanternError(f"the data has labels the model does not know: {', '.join(unknown[:10])}")
        self.cache = [transform(load_uint8(e.path)) for e in examples] if preload else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        example = self.examples[i]
        tensor = self.cache[i] if self.cache is not None else self.transform(load_uint8(example.path))
        if self.multilabel:
            target = torch.zeros(len(self.index))
            target[[self.index[label] for label in example.labels]] = 1.0
            return tensor, target
        return tensor, torch.tensor(self.index[example.labels[0]])
