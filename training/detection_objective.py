"""Training a detector (object detection, instance segmentation): images of any size in lists, the detector's own
losses summed (RPN objectness and boxes, box classes and offsets, masks), SGD with momentum as torchvision's detection
references train, random horizontal flips, and validation as COCO scores it (training/detection_metrics.py).

Validation keeps torchvision's evaluation thresholds (score 0.05, 100 detections an image), not the version's
serving settings: mAP ranks every detection, and a high score threshold would cut its curve short."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Sampler

from registry.detectors import apply_detection_settings
from registry.settings import DetectionSettings, SegmentationSettings
from training.config import TrainConfig
from training.detection_data import DetectionDataset, collate
from training.detection_metrics import DetectionScores
from training.evaluation import autocast
from training.sources import TrainingData

MOMENTUM = 0.9
EVALUATION_SCORE_THRESH = 0.05
EVALUATION_DETECTIONS = 100


def flip_target(target: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """`target` for the image mirrored left to right."""
    flipped = dict(target)
    boxes = target["boxes"]
    flipped["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return flipped


class LossWindow:
    """Running means of the detector's losses since the last flush (kept on the device)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for name, value in {"loss": sum(losses.values()), **losses}.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float() * images
        self.count += images

    def flush(self) -> dict[str, float]:
        out = {f"train_{name}": float(total) / self.count for name, total in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return out


class DetectionObjective:
    """Object detection, and instance segmentation when the settings are a segmentation's."""

    def __init__(self, config: TrainConfig, labels: list[str], settings: DetectionSettings, data: TrainingData,
                 device: torch.device, workers: int) -> None:
        self.config, self.settings, self.device, self.workers = config, settings, device, workers
        self.masks = isinstance(settings, SegmentationSettings)
        self.labels = labels
        self.train_set = DetectionDataset(data.train, labels, self.masks)
        self.val_loader = DataLoader(DetectionDataset(data.val, labels, self.masks),
                                     batch_size=max(8, config.batch_size), collate_fn=collate, num_workers=workers,
                                     persistent_workers=workers > 0)
        self.window = LossWindow()

    def train_size(self) -> int:
        return len(self.train_set)

    def configure(self, model: nn.Module) -> nn.Module:
        """The detector with the session's settings, as the version will serve it (its input sizes above all)."""
        return apply_detection_settings(model, self.settings)

    def optimizer(self, model: nn.Module) -> Optimizer:
        trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
        return torch.optim.SGD(trained, lr=self.config.lr, momentum=MOMENTUM, weight_decay=self.config.weight_decay)

    def batches(self, plan: Sampler[list[int]]) -> Iterable[Any]:
        return DataLoader(self.train_set, batch_sampler=plan, collate_fn=collate, num_workers=self.workers)

    def _inputs(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [image.to(self.device, non_blocking=True).float() / 255.0 for image in images]

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        images, targets = batch
        flips = torch.rand(len(images), generator=generator) < 0.5
        inputs, wanted = [], []
        for image, target, flip in zip(self._inputs(images), targets, flips.tolist()):
            train = {key: value.to(self.device, non_blocking=True) for key, value in target.train.items()}
            if flip and self.config.augment:
                image, train = image.flip(-1), flip_target(train, image.shape[-1])
            inputs.append(image)
            wanted.append(train)
        with autocast(self.device):
            losses = model(inputs, wanted)
        losses = {name: value.float() for name, value in losses.items()}
        self.window.add(losses, len(images))
        return sum(losses.values())

    def flush(self) -> dict[str, float]:
        return self.window.flush()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        threshold = self.settings.mask_pixel_score_threshold if self.masks else 0.5
        scores = DetectionScores(self.labels, self.masks, threshold)
        apply_detection_settings(model, self.settings.model_copy(update={
            "box_score_thresh": EVALUATION_SCORE_THRESH, "box_detections_per_img": EVALUATION_DETECTIONS}))
        model.eval()
        try:
            with torch.inference_mode(), autocast(self.device):
                for images, targets in self.val_loader:
                    scores.update(model(self._inputs(images)), targets)
        finally:
            apply_detection_settings(model, self.settings)
            model.train()
        return scores.compute("val")
