"""Where a session's images come from: an image folder, a JSONL index (classes, or the cloud's boxes and polygons for
detection), or the synthetic shapes set; and the split."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from registry.errors import LanternError
from registry.settings import is_detection
from training.config import TrainConfig
from training.datasets import Example, holdout_split, label_set, read_examples
from training.detection_index import DetectionExample, detection_labels, read_detection_index
from training.shapes import INDEX_FILE, ShapesConfig, write_shapes_dataset
from training.shapes_instances import InstanceShapesConfig, write_instance_shapes_dataset

SHAPES_SOURCE = re.compile(r"shapes(?::(?P<count>[0-9]+))?")
DEFAULT_SHAPES_COUNT = 3000
VALIDATION_SHAPES_SEED = 1000


@dataclass(frozen=True)
class TrainingData:
    """The training and validation examples, and the labels the data uses."""

    train: list[Example] | list[DetectionExample]
    val: list[Example] | list[DetectionExample]
    labels: list[str]


def resolve_source(source: str, config: TrainConfig, cache_dir: Path, shapes_seed: int = 0) -> Path:
    """A path for `source`; `shapes[:COUNT]` is generated (once) at the session's image size under `cache_dir`
    from `shapes_seed` (validation shapes use another seed than training shapes, so they are different images)."""
    match = SHAPES_SOURCE.fullmatch(source)
    if not match:
        path = Path(source)
        if not path.exists():
            raise LanternError(f"no data at {source}: give an image folder (one sub-folder per class), "
                               "a JSONL index with image_url and label, or shapes[:COUNT]")
        return path
    count = int(match.group("count") or DEFAULT_SHAPES_COUNT)
    if is_detection(config.task):
        instances = InstanceShapesConfig(count=count, image_size=max(config.image_size, 64), seed=shapes_seed,
                                         task=config.task)
        folder = cache_dir / f"shapes-{config.task}-{count}-{instances.image_size}px-seed{shapes_seed}"
        if not (folder / INDEX_FILE).is_file():
            write_instance_shapes_dataset(folder, instances)
        return folder
    multilabel = config.task == "multilabel"
    shapes = ShapesConfig(count=count, image_size=max(config.image_size, 32), seed=shapes_seed,
                          multilabel=multilabel)
    folder = cache_dir / f"shapes-{count}-{shapes.image_size}px-seed{shapes.seed}{'-multilabel' if multilabel else ''}"
    if not (folder / INDEX_FILE).is_file():
        write_shapes_dataset(folder, shapes)
    return folder


def _check_task(examples: list[Example], task: str, where: str) -> None:
    if not examples:
        raise LanternError(f"{where} holds no images")
    if task == "multiclass":
        for example in examples:
            if len(example.labels) != 1:
                raise LanternError(f"{example.path} has {len(example.labels)} labels, but multi-class training needs "
                                   "exactly one per image (use --task multilabel)")


def _detection_index(source: Path) -> Path:
    index = source / INDEX_FILE if source.is_dir() else source
    if not index.is_file():
        raise LanternError(f"no detection index at {source}: give a JSONL file (or a folder holding {INDEX_FILE}) "
                           "whose lines have image_url and label objects with topX, topY, bottomX, bottomY")
    return index


def _load_detection_data(config: TrainConfig, cache_dir: Path) -> TrainingData:
    source = _detection_index(resolve_source(config.data, config, cache_dir))
    examples = read_detection_index(source, config.task)
    if config.val_data:
        val_source = _detection_index(resolve_source(config.val_data, config, cache_dir,
                                                     shapes_seed=VALIDATION_SHAPES_SEED))
        train, val = examples, read_detection_index(val_source, config.task)
    else:
        train, val = holdout_split(examples, config.val_fraction, source.parent)
    labels = detection_labels(train + val)
    if not labels:
        raise LanternError(f"{source} labels no objects: a detector needs boxes to learn from")
    return TrainingData(train, val, labels)


def load_data(config: TrainConfig, cache_dir: Path) -> TrainingData:
    """Read the examples and split off validation (given, or a deterministic hold-out of `val_fraction`)."""
    if is_detection(config.task):
        return _load_detection_data(config, cache_dir)
    source = resolve_source(config.data, config, cache_dir)
    examples = read_examples(source)
    _check_task(examples, config.task, str(source))
    if config.val_data:
        val_source = resolve_source(config.val_data, config, cache_dir, shapes_seed=VALIDATION_SHAPES_SEED)
        train, val = examples, read_examples(val_source)
        _check_task(val, config.task, str(val_source))
    else:
        root = source if source.is_dir() else source.parent
        train, val = holdout_split(examples, config.val_fraction, root)
    return TrainingData(train, val, label_set(train + val))
