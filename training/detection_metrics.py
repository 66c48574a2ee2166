"""Validation metrics of a detector, as COCO computes them (torchmetrics' MeanAveragePrecision over pycocotools):
mAP@[.5:.95] (what a session's best checkpoint is chosen by), mAP@0.5, and mAP@0.5 per class; for instance
segmentation the same over masks. Crowds count as COCO counts them: a detection on a crowd is neither right nor
wrong."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.detection import MeanAveragePrecision

from training.detection_data import DetectionTarget


class DetectionScores:
    """Accumulates a validation pass's detections against its targets; `compute()` gives the metrics by name."""

    def __init__(self, labels: Sequence[str], masks: bool, mask_threshold: float = 0.5) -> None:
        self.labels = list(labels)
        self.masks = masks
        self.mask_threshold = mask_threshold
        kinds = ("bbox", "segm") if masks else "bbox"
        self.overall = MeanAveragePrecision(iou_type=kinds)
        self.per_class = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5], class_metrics=True)

    def update(self, detections: list[dict[str, torch.Tensor]], targets: list[DetectionTarget]) -> None:
        """Add one batch: a detector's answers (eval mode) and the images' targets."""
        predicted, truth = [], []
        for answer, target in zip(detections, targets):
            found = {key: answer[key].detach().cpu() for key in ("boxes", "scores", "labels")}
            expected = {"boxes": torch.cat([target.train["boxes"], target.crowd_boxes]),
                        "labels": torch.cat([target.train["labels"], target.crowd_labels]),
                        "iscrowd": torch.cat([torch.zeros(len(target.train["boxes"]), dtype=torch.int64),
                                              torch.ones(len(target.crowd_boxes), dtype=torch.int64)])}
            if self.masks:
                found["masks"] = (answer["masks"].detach().cpu()[:, 0] > self.mask_threshold).to(torch.uint8)
                masks = target.train["masks"]
                crowd = torch.zeros((len(target.crowd_boxes), *masks.shape[1:]), dtype=torch.uint8)
                for number, (x0, y0, x1, y1) in enumerate(target.crowd_boxes.round().int().tolist()):
                    crowd[number, y0:y1, x0:x1] = 1  # a crowd's region: its box
                expected["masks"] = torch.cat([masks, crowd])
            predicted.append(found)
            truth.append(expected)
        self.overall.update(predicted, truth)
        self.per_class.update([{k: v for k, v in p.items() if k != "masks"} for p in predicted],
                              [{k: v for k, v in t.items() if k != "masks"} for t in truth])

    def compute(self, prefix: str = "val") -> dict[str, float]:
        """`{prefix}_map`, `{prefix}_map_50`, `{prefix}_map_50_<label>` for each label seen (and `{prefix}_mask_map`,
        `{prefix}_mask_map_50` for masks); a metric with nothing to measure is -1, as COCO reports it."""
        overall, per_class = self.overall.compute(), self.per_class.compute()
        box = "bbox_" if self.masks else ""
        out = {f"{prefix}_map": float(overall[f"{box}map"]), f"{prefix}_map_50": float(overall[f"{box}map_50"])}
        if self.masks:
            out[f"{prefix}_mask_map"] = float(overall["segm_map"])
            out[f"{prefix}_mask_map_50"] = float(overall["segm_map_50"])
        classes = per_class["classes"].reshape(-1).tolist()
        values = per_class["map_per_class"].reshape(-1).tolist()
        for number, value in zip(classes, values):
            if 1 <= number <= len(self.labels):
                out[f"{prefix}_map_50_{self.labels[number - 1]}"] = float(value)
        return out
