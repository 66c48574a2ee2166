"""Detectors Lantern rebuilds (registry/detectors.py): every architecture builds without downloading weights, trains
(a loss per part) and detects (boxes, labels, scores, and masks for segmenters); the settings that act inside a
detector change what it answers; torchvision's detectors export to ONNX faithfully."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from registry.detection_inference import torch_detector
from registry.detector_onnx import detections_difference, export_detector_onnx, onnx_detector, parity_images
from registry.detectors import DETECTORS, apply_detection_settings
from registry.model_files import DEFAULT_PARITY_TOLERANCE
from registry.settings import build_settings

SIDE = 128


def images_and_targets(masks: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIDE, SIDE, generator=generator) for _ in range(2)]
    targets = []
    for box in ([10.0, 20.0, 60.0, 70.0], [40.0, 30.0, 100.0, 90.0]):
        target = {"boxes": torch.tensor([box]), "labels": torch.tensor([1])}
        if masks:
            mask = torch.zeros(1, SIDE, SIDE, dtype=torch.uint8)
            x0, y0, x1, y1 = (int(v) for v in box)
            mask[0, y0:y1, x0:x1] = 1
            target["masks"] = mask
        targets.append(target)
    return images, targets


@pytest.mark.parametrize("name", list(DETECTORS))
def test_every_detector_builds_trains_and_detects(name: str) -> None:
    architecture = DETECTORS[name]
    torch.manual_seed(0)
    model = architecture.build(3)
    segments = "instance_segmentation" in architecture.tasks
    apply_detection_settings(model, build_settings("object_detection", {"min_size": SIDE, "max_size": SIDE}))
    images, targets = images_and_targets(segments)
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(loss) for loss in losses.values()) and ("loss_mask" in losses) == segments
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        answers = model(images)
    assert len(answers) == 2
    for answer in answers:
        assert {"boxes", "labels", "scores"} <= set(answer) and ("masks" in answer) == segments
        assert answer["boxes"].shape[1:] == (4,) and (answer["labels"] <= 3).all()


def test_the_settings_that_act_inside_a_detector_change_its_answers() -> None:
    torch.manual_seed(0)
    model = DETECTORS["small_detector"].build(3).eval()
    images, _ = images_and_targets(masks=False)
    everything = build_settings("object_detection", {"min_size": SIDE, "max_size": SIDE, "box_score_thresh": 0.0,
                                                     "box_detections_per_img": 1000, "nms_iou_thresh": 1.0})
    with torch.no_grad():
        answered = apply_detection_settings(model, everything)(images)[0]
        assert len(answered["boxes"]) > 5  # an untrained detector proposes boxes everywhere
        capped = apply_detection_settings(model, everything.model_copy(update={"box_detections_per_img": 3}))(images)
        assert len(capped[0]["boxes"]) == 3
        scores = answered["scores"].sort(descending=True).values
        threshold = float(scores[len(scores) // 2])
        fewer = apply_detection_settings(model, everything.model_copy(update={"box_score_thresh": threshold}))(images)
        assert 0 < len(fewer[0]["boxes"]) < len(answered["boxes"]) and (fewer[0]["scores"] > threshold).all()
        merged = apply_detection_settings(model, everything.model_copy(update={"nms_iou_thresh": 0.1}))(images)
        assert len(merged[0]["boxes"]) < len(answered["boxes"])
    assert model.transform.min_size == (SIDE,) and model.roi_heads.detections_per_img == 1000


# Mask R-CNN and Faster R-CNN v2 export as well (by hand: parity 9.6e-4 and 5e-6), at 15 s each: left out for time
@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                                  "retinanet_resnet50_fpn"])
def test_torchvisions_detectors_export_to_onnx_faithfully(name: str, tmp_path: Path) -> None:
    """Untrained weights at a 0.01 score threshold propose 100 boxes an image, so the parity check has detections
    to match; each ONNX output holds what it is named for (RetinaNet answers its scores before its labels)."""
    torch.manual_seed(0)
    settings = build_settings("object_detection", {"min_size": SIDE, "max_size": SIDE, "box_score_thresh": 0.01})
    model = apply_detection_settings(DETECTORS[name].build(3), settings).eval()
    expected = torch_detector(model, "cpu")
    actual = onnx_detector(export_detector_onnx(model, SIDE, tmp_path / "model.onnx"), "cpu")
    for image in parity_images(settings):  # three sizes: the image axes are dynamic
        ours, theirs = expected(image), actual(image)
        assert len(ours.scores) > 10 and len(theirs.scores) == len(ours.scores)
        # classes 0-3: a RetinaNet has no background class, and untrained it scores slot 0 too (answers leave it out)
        assert np.issubdtype(theirs.classes.dtype, np.integer) and set(theirs.classes.tolist()) <= {0, 1, 2, 3}
        assert ((theirs.scores >= 0.01) & (theirs.scores <= 1)).all()
        assert detections_difference(ours, theirs, image.shape[2], image.shape[1], 0.01) < DEFAULT_PARITY_TOLERANCE
