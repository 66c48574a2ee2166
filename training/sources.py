"""Where a session's images come from: an image folder, a JSONL index, or the synthetic shapes set; and the split."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from registry.errors import LanternError
from training.config import TrainConfig
from training.datasets import Example, holdout_split, label_set, read_examples
from training.shapes import INDEX_FILE, ShapesConfig, write_shapes_dataset

SHAPES_SOURCE = re.compile(r"shapes(?::(?P<count>[0-9]+))?")
DEFAULT_SHAPES_COUNT = 3000
VALIDATION_SHAPES_SEED = 1000


@dataclass(frozen=True)
class TrainingData:
    """The training and validation examples, and the labels the data uses."""

    train: list[Example]
    val: list[Example]
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


def load_data(config: TrainConfig, cache_dir: Path) -> TrainingData:
    """Read the examples and split off validation (given, or a deterministic hold-out of `val_fraction`)."""
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
