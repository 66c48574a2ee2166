"""The synthetic shapes dataset: deterministic, with masks that mark the labelled objects."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from training.shapes import SHAPE_CLASSES, ShapesConfig, make_sample, write_shapes_dataset


def test_generation_is_deterministic_and_per_image():
    a = make_sample(ShapesConfig(count=10, seed=5), 7)
    b = make_sample(ShapesConfig(count=1000, seed=5), 7)
    assert a.labels == b.labels and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = make_sample(ShapesConfig(seed=6), 7)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_dataset_files_and_masks(tmp_path):
    index = write_shapes_dataset(tmp_path, ShapesConfig(count=30, image_size=48, seed=1))
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert len(rows) == 30 and {r["label"] for r in rows} == set(SHAPE_CLASSES)
    assert (tmp_path / "labels.txt").read_text().split() == list(SHAPE_CLASSES)
    for row in rows:
        image = Image.open(tmp_path / row["image_url"])
        mask = np.asarray(Image.open(tmp_path / row["mask_url"]))
        assert image.size == (48, 48) and image.mode == "RGB"
        assert set(np.unique(mask)) == {0, SHAPE_CLASSES.index(row["label"]) + 1}
        assert 0.03 < (mask > 0).mean() < 0.5


def test_multilabel_variant_lists_every_shape_with_its_mask(tmp_path):
    index = write_shapes_dataset(tmp_path, ShapesConfig(count=40, image_size=64, seed=2, multilabel=True))
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert any(len(r["label"]) > 1 for r in rows)
    for row in rows:
        assert isinstance(row["label"], list)
        mask = np.asarray(Image.open(tmp_path / row["mask_url"]))
        present = {SHAPE_CLASSES[v - 1] for v in np.unique(mask) if v}
        assert present == set(row["label"])
