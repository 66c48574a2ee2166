"""A detector's validation metrics (training/detection_metrics.py), as COCO computes them: perfect answers score 1,
a box off by a margin loses mAP@[.5:.95] but not mAP@0.5, a wrong class scores 0, a detection on a crowd costs
nothing, and masks are scored as masks."""

from __future__ import annotations

import pytest
import torch

from training.detection_data import DetectionTarget
from training.detection_metrics import DetectionScores

LABELS = ["circle", "square", "triangle"]
SIDE = 64


def target(boxes: list[list[float]], classes: list[int], crowd: list[list[float]] = ()) -> DetectionTarget:
    masks = torch.zeros((len(boxes), SIDE, SIDE), dtype=torch.uint8)
    for number, (x0, y0, x1, y1) in enumerate(boxes):
        masks[number, int(y0):int(y1), int(x0):int(x1)] = 1
    return DetectionTarget({"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(classes),
                            "masks": masks}, torch.tensor(list(crowd), dtype=torch.float32).reshape(-1, 4),
                           torch.ones(len(crowd), dtype=torch.int64))


def answer(boxes: list[list[float]], classes: list[int], masks: torch.Tensor | None = None) -> dict:
    found = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(classes),
             "scores": torch.linspace(0.9, 0.8, len(boxes))}
    if masks is not None:
        found["masks"] = masks[:, None].float()
    return found


TRUTH = target([[4, 4, 24, 24], [30, 30, 60, 50]], [1, 2])


def scores(detections: dict, truth: DetectionTarget = TRUTH, masks: bool = False) -> dict[str, float]:
    metric = DetectionScores(LABELS, masks)
    metric.update([detections], [truth])
    return metric.compute()


def test_perfect_answers_score_one_overall_and_per_class() -> None:
    result = scores(answer([[4, 4, 24, 24], [30, 30, 60, 50]], [1, 2]))
    assert result == {"val_map": pytest.approx(1.0), "val_map_50": pytest.approx(1.0),
                      "val_map_50_circle": pytest.approx(1.0), "val_map_50_square": pytest.approx(1.0)}


def test_a_loose_box_keeps_map_50_but_not_the_stricter_thresholds() -> None:
    result = scores(answer([[4, 4, 27, 27], [30, 30, 60, 50]], [1, 2]))  # IoU 400 / 529 = 0.76 for the circle
    assert result["val_map_50"] == pytest.approx(1.0) and 0.5 < result["val_map"] < 1.0
    assert result["val_map_50_circle"] == pytest.approx(1.0)


def test_a_wrong_class_scores_nothing_for_either_class() -> None:
    result = scores(answer([[4, 4, 24, 24]], [3]))
    assert result["val_map_50_circle"] == 0.0 and result["val_map_50"] < 0.5


def test_a_detection_on_a_crowd_costs_nothing() -> None:
    with_crowd = target([[4, 4, 24, 24]], [1], crowd=[[40, 40, 60, 60]])
    on_crowd = scores(answer([[4, 4, 24, 24], [42, 42, 58, 58]], [1, 1]), with_crowd)
    assert on_crowd["val_map"] == pytest.approx(1.0)
    elsewhere = scores(answer([[42, 42, 58, 58], [4, 4, 24, 24]], [1, 1]), target([[4, 4, 24, 24]], [1]))
    assert elsewhere["val_map"] < 1.0  # the same detection with no crowd there is a false positive ranked first


def test_masks_are_scored_as_masks() -> None:
    perfect = scores(answer([[4, 4, 24, 24], [30, 30, 60, 50]], [1, 2], TRUTH.train["masks"].clone()), masks=True)
    assert perfect["val_mask_map"] == pytest.approx(1.0) and perfect["val_map"] == pytest.approx(1.0)
    hollow = TRUTH.train["masks"].clone()
    hollow[:, 8:, :] = 0  # right boxes, masks cut to their top rows
    cut = scores(answer([[4, 4, 24, 24], [30, 30, 60, 50]], [1, 2], hollow), masks=True)
    assert cut["val_map"] == pytest.approx(1.0) and cut["val_mask_map"] < 0.5
