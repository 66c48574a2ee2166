"""Training a classifier: fixed-size batches augmented on the device, cross-entropy (binary per label for
multi-label), AdamW, and validation loss, accuracy and (multi-label) micro F1."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Sampler

from registry.preprocess import Preprocess
from registry.settings import ClassificationSettings
from registry.spec import ModelSpec
from training.config import TrainConfig
from training.datasets import ImageDataset
from training.evaluation import MetricWindow, autocast, evaluate
from training.sources import TrainingData
from training.transforms import TrainImage, batch_augment


class ClassificationObjective:
    """Multi-class and multi-label classification."""

    def __init__(self, config: TrainConfig, spec: ModelSpec, labels: list[str], settings: ClassificationSettings,
                 data: TrainingData, device: torch.device, workers: int, preload: bool) -> None:
        self.config, self.device, self.workers = config, device, workers
        self.multilabel = config.task == "multilabel"
        self.train_set = ImageDataset(data.train, labels, TrainImage(config.image_size), self.multilabel,
                                      preload=preload)
        val_set = ImageDataset(data.val, labels, Preprocess.for_model(spec, settings).crop, self.multilabel,
                               preload=preload)
        self.augment = batch_augment(config.image_size, spec, config.augment)
        self.loss_fn = nn.BCEWithLogitsLoss() if self.multilabel else nn.CrossEntropyLoss()
        self.val_loader = DataLoader(val_set, batch_size=max(64, config.batch_size), num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.window = MetricWindow()

    def train_size(self) -> int:
        return len(self.train_set)

    def configure(self, model: nn.Module) -> nn.Module:
        return model

    def optimizer(self, model: nn.Module) -> Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def batches(self, plan: Sampler[list[int]]) -> Iterable[Any]:
        return DataLoader(self.train_set, batch_sampler=plan, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda")

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        inputs, targets = batch
        inputs = self.augment(inputs.to(self.device, non_blocking=True), generator)
        targets = targets.to(self.device, non_blocking=True)
        with autocast(self.device):
            logits = model(inputs).float()
            loss = self.loss_fn(logits, targets)
        self.window.add(loss, logits, targets, self.multilabel)
        return loss

    def flush(self) -> dict[str, float]:
        return self.window.flush()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.val_loader, self.augment, self.loss_fn, self.device, self.multilabel)
