"""Training and validation metrics: per-batch sums (accuracy; for multi-label, exact match and the counts of micro
F1), the running window between reports, and a validation pass under mixed precision on CUDA."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from training.augment import BatchAugment


def batch_metrics(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, torch.Tensor]:
    """Per-batch sums: correct predictions, and true/false positives and false negatives for multi-label F1."""
    if not multilabel:
        return {"correct": (logits.argmax(1) == targets).sum()}
    predicted = logits > 0
    truth = targets > 0.5
    return {"correct": (predicted == truth).all(dim=1).sum(), "tp": (predicted & truth).sum(),
            "fp": (predicted & ~truth).sum(), "fn": (~predicted & truth).sum()}


def summarise(sums: dict[str, float], count: int, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_loss": sums["loss"] / max(count, 1), f"{prefix}_accuracy": sums["correct"] / max(count, 1)}
    if "tp" in sums and prefix == "val":
        denominator = 2 * sums["tp"] + sums["fp"] + sums["fn"]
        out["val_f1"] = 2 * sums["tp"] / denominator if denominator else 1.0
    return out


class MetricWindow:
    """Running sums of the training metrics since the last report (kept on the device: no sync per batch)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> None:
        batch = {"loss": loss.detach() * len(targets), **batch_metrics(logits.detach(), targets, multilabel)}
        for key, value in batch.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        self.count += len(targets)

    def flush(self) -> dict[str, float]:
        out = summarise({k: float(v) for k, v in self.sums.items()}, self.count, "train") if self.count else {}
        self.sums, self.count = {}, 0
        return out


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def evaluate(model: nn.Module, loader: DataLoader, augment: BatchAugment, loss_fn: nn.Module, device: torch.device,
             multilabel: bool) -> dict[str, float]:
    """Validation loss, accuracy (exact match for multi-label) and, for multi-label, micro F1."""
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    with torch.inference_mode(), autocast(device):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            logits = model(augment.normalize(inputs.float() / 255.0)).float()
            batch = {"loss": loss_fn(logits, targets) * len(targets), **batch_metrics(logits, targets, multilabel)}
            for key, value in batch.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += len(targets)
    model.train()
    return summarise(sums, count, "val")
