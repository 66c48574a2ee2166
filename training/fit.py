"""A compact supervised fine-tuning run: the spec's model trained on labelled images for a number of iterations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from registry.preprocess import Preprocess
from registry.spec import ModelSpec, build_module
from training.datasets import Example, ImageDataset


def train_transform(size: int, spec: ModelSpec) -> v2.Compose:
    """Random resized crop + horizontal flip + mild colour jitter, then normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.95, 1.05), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.1, 0.1, 0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.normalize_mean), list(spec.normalize_std)),
    ])


def valid_sizes(image_size: int) -> tuple[int, int]:
    """The classification defaults (resize 256, crop 224) scaled to `image_size`."""
    return round(image_size * 256 / 224), image_size


@dataclass
class FitResult:
    model: nn.Module
    iterations: int
    train_loss: float
    val_accuracy: float


def _accuracy(model: nn.Module, loader: DataLoader, multilabel: bool) -> float:
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for inputs, targets in loader:
            logits = model(inputs)
            if multilabel:
                correct += int(((logits > 0).float() == targets).all(dim=1).sum())
            else:
                correct += int((logits.argmax(1) == targets).sum())
            total += len(targets)
    return correct / max(total, 1)


def fit(spec: ModelSpec, labels: list[str], train: list[Example], val: list[Example], image_size: int,
        iterations: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
        on_report: Callable[[int, float], None] | None = None) -> FitResult:
    """Train a fresh model for `spec` with AdamW and a cosine learning rate; returns it with its validation accuracy."""
    torch.manual_seed(seed)
    multilabel = spec.task == "multilabel"
    model = build_module(spec).train()
    resize, crop = valid_sizes(image_size)
    train_loader = DataLoader(ImageDataset(train, labels, train_transform(image_size, spec), multilabel, preload=True),
                              batch_size=batch_size, shuffle=True, drop_last=len(train) > batch_size,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(ImageDataset(val, labels, Preprocess(resize, crop, spec.normalize_mean, spec.normalize_std),
                                         multilabel, preload=True),
                            batch_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=iterations, pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    step, loss_value = 0, float("nan")
    while step < iterations:
        for inputs, targets in train_loader:
            model.train()
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step, loss_value = step + 1, float(loss.detach())
            if on_report:
                on_report(step, loss_value)
            if step >= iterations:
                break
    return FitResult(model.eval(), step, loss_value, _accuracy(model, val_loader, multilabel))
