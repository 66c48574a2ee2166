"""Detection examples as detectors take them (training/detection_data.py): boxes in pixels, classes counted from 1,
masks rasterised from the polygons onto the objects' pixels, crowds kept out of training, mismatches named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from registry.errors import LanternError
from training.detection_data import DetectionDataset, collate
from training.detection_index import read_detection_index
from training.shapes import SHAPE_CLASSES
from training.shapes_instances import InstanceShapesConfig, write_instance_shapes_dataset

LABELS = list(SHAPE_CLASSES)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instances")
    return write_instance_shapes_dataset(folder, InstanceShapesConfig(count=8, image_size=96, seed=4,
                                                                      task="instance_segmentation"))


def test_targets_match_the_objects_pixels(written: Path) -> None:
    examples = read_detection_index(written, "instance_segmentation")
    dataset = DetectionDataset(examples, LABELS, masks=True)
    overlaps = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
        instances = np.asarray(Image.open(written.parent / f"masks/{index:06d}.png"))
        boxes, classes, masks = target.train["boxes"], target.train["labels"], target.train["masks"]
        assert len(boxes) == len(classes) == len(masks) == instances.max() and target.crowd_boxes.shape == (0, 4)
        for number, (box, cls, mask) in enumerate(zip(boxes, classes, masks)):
            pixels = instances == number + 1
            ys, xs = np.nonzero(pixels)
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1e-3)
            assert LABELS[int(cls) - 1] == examples[index].objects[number].label
            if pixels.sum() >= 100:
                drawn = mask.numpy().astype(bool)
                overlaps.append((drawn & pixels).sum() / (drawn | pixels).sum())
    assert overlaps and min(overlaps) > 0.85 and np.mean(overlaps) > 0.95
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2


def test_crowds_unknown_labels_and_wrong_sizes(written: Path, tmp_path: Path) -> None:
    line = json.loads(written.read_text().splitlines()[0])
    line["image_url"] = str(written.parent / line["image_url"])
    line["label"][0]["isCrowd"] = 1
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps(line) + "\n")
    (example,) = read_detection_index(index, "object_detection")
    _, target = DetectionDataset([example], LABELS, masks=False)[0]
    assert len(target.train["boxes"]) == len(line["label"]) - 1 and target.crowd_boxes.shape == (1, 4)
    assert "masks" not in target.train
    first = read_detection_index(written, "object_detection")[0]
    with pytest.raises(LanternError, match=r"label\(s\) .* not among nothing"):
        DetectionDataset([first], ["nothing"], masks=False)[0]
    line["image_details"] = {"width": 640, "height": 480}
    index.write_text(json.dumps(line) + "\n")
    (wrong,) = read_detection_index(index, "object_detection")
    with pytest.raises(LanternError, match="is 96 x 96 px, but its index line says 640 x 480"):
        DetectionDataset([wrong], LABELS, masks=False)[0]
