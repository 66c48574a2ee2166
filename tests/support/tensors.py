"""Random image tensors and a relative difference, for the explanation tests."""

from __future__ import annotations

import torch


def image_tensor(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))
