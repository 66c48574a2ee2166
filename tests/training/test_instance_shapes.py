"""Shapes for detection and instance segmentation (training/shapes_instances.py): several objects per image, some
small and some touching; each box is tight around the object's visible pixels, each polygon lies on them, and the
written index is read back by the cloud-format reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.draw import polygon2mask

from support.common import lantern_here
from training.detection_index import read_detection_index
from training.shapes import SHAPE_CLASSES
from training.shapes_instances import InstanceShapesConfig, make_instance_sample

CONFIG = InstanceShapesConfig(count=40, image_size=128, seed=3, task="instance_segmentation")


def polygons_mask(polygons: tuple[tuple[float, ...], ...], size: int) -> np.ndarray:
    """The pixels whose centres lie inside `polygons` (pixel i spans [i, i + 1): its centre is i + 0.5)."""
    inside = np.zeros((size, size), bool)
    for polygon in polygons:
        rows_cols = np.array([(y * size - 0.5, x * size - 0.5) for x, y in zip(polygon[0::2], polygon[1::2])])
        inside |= polygon2mask((size, size), rows_cols)
    return inside


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_images_hold_several_objects_some_small_and_some_touching() -> None:
    samples = [make_instance_sample(CONFIG, i) for i in range(CONFIG.count)]
    counts = [len(sample.objects) for sample in samples]
    assert min(counts) >= 1 and max(counts) <= CONFIG.max_objects and np.mean(counts) > 2
    areas = [(x1 - x0) * (y1 - y0) for sample in samples for x0, y0, x1, y1 in (o.box for o in sample.objects)]
    assert sum(area < 0.015 for area in areas) >= 10  # small: under 1.5 % of the image
    touching = 0
    for sample in samples:
        instances = np.asarray(sample.instances)
        right, below = instances[:, 1:] != instances[:, :-1], instances[1:, :] != instances[:-1, :]
        both = (instances[:, 1:] > 0) & (instances[:, :-1] > 0)
        touching += bool((right & both).any() or (below & (instances[1:] > 0) & (instances[:-1] > 0)).any())
    assert touching >= 5, touching
    assert {o.label for sample in samples for o in sample.objects} == set(SHAPE_CLASSES)


def test_boxes_are_tight_and_polygons_lie_on_the_objects_pixels() -> None:
    size = CONFIG.image_size
    overlaps = []
    for index in range(CONFIG.count):
        sample = make_instance_sample(CONFIG, index)
        instances = np.asarray(sample.instances)
        assert instances.max() == len(sample.objects)  # object k of the line is the map's k + 1
        for number, obj in enumerate(sample.objects):
            mask = instances == number + 1
            ys, xs = np.nonzero(mask)
            assert np.allclose(obj.box, (xs.min() / size, ys.min() / size, (xs.max() + 1) / size,
                                         (ys.max() + 1) / size), atol=1e-6)
            assert obj.polygons and all(len(ring) >= 6 and all(0 <= v <= 1 for v in ring) for ring in obj.polygons)
            if mask.sum() >= 100:  # a tiny object is mostly its edge, where the outline's simplification shows
                overlaps.append(iou(polygons_mask(obj.polygons, size), mask))
                assert overlaps[-1] > 0.85, (index, number)
    assert len(overlaps) >= 50 and np.mean(overlaps) > 0.97


def test_the_command_writes_an_index_the_reader_takes(tmp_path: Path) -> None:
    out = tmp_path / "boxes"
    lantern_here("data", "shapes", str(out), "--count", "6", "--task", "object_detection", "--max-objects", "4",
                 "--seed", "2")  # in this process: the command without a process's imports
    examples = read_detection_index(out / "index.jsonl", "object_detection")
    assert len(examples) == 6 and all(1 <= len(e.objects) <= 4 for e in examples)
    assert all(e.path.is_file() and (e.width, e.height) == (128, 128) for e in examples)
    assert all(o.polygons == () for e in examples for o in e.objects)  # boxes only for detection
    assert (out / "labels.txt").read_text().split() == list(SHAPE_CLASSES)
    with Image.open(examples[0].path) as image:
        assert image.size == (128, 128)
    refused = lantern_here("data", "shapes", str(tmp_path / "x"), "--task", "object_detection", "--multilabel",
                           exit_code=2)
    assert "--multilabel is for classification" in refused.stderr
