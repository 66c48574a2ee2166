"""What the training loop asks of a task: its optimizer, its batches, the loss of one batch, the training metrics
since the last report, and a validation pass. The loop owns everything else (session, checkpoints, resume, signals,
callbacks, tracking), so classification and detection train under the same session control."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import Sampler


class Objective(Protocol):
    """One task's side of training."""

    def train_size(self) -> int:
        """How many training examples the batch plan draws from."""

    def configure(self, model: nn.Module) -> nn.Module:
        """The freshly built model made ready to train (e.g. a detector's input sizes)."""

    def optimizer(self, model: nn.Module) -> Optimizer: ...

    def batches(self, plan: Sampler[list[int]]) -> Iterable[Any]:
        """The training batches of the iterations `plan` covers, in order."""

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch (augmented with `generator`'s draws); its metrics join the running window."""

    def flush(self) -> dict[str, float]:
        """The `train_*` metrics since the last flush."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The `val_*` metrics of a pass over the validation data (the model is left in training mode)."""
