"""XRAI on torch: integrated gradients from a black and a white baseline in one batched pass (PAIR's rule), then the
region stage of `explain.xrai_regions`.

PAIR's IG (`saliency.core.IntegratedGradients`) differs from captum's methods: it samples `linspace(0, 1, n)` (both
ends) with equal weights 1/n, so it is done here directly, with the two baselines' path points batched together.
The baselines are PAIR's defaults: the image's own minimum and maximum value everywhere (black and white).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from explain.integrated import fitting_path_batch, path_batch_size
from explain.xrai_regions import segment_masks, select_regions


@dataclass(frozen=True)
class XRAIResult:
    """Per target: region gains [T, H, W] (float64), ranks [T, H, W], IG per baseline [T, 2, 3, H, W], and the
    completeness error of each baseline's IG; plus the stage timings."""

    gains: Tensor
    ranks: Tensor
    ig: Tensor
    completeness_error: list[list[float]]
    gradient_seconds: float
    region_seconds: float
    segments: int
    internal_batch_size: int  # path points per pass, after any halving for memory


def pair_integrated_gradients(score: Callable[[Tensor], Tensor], x: Tensor, baselines: Tensor, steps: int,
                              batch_size: int) -> Tensor:
    """IG of `score` (a batch of inputs -> one scalar each) at `x` [C, H, W] from each of `baselines` [B, C, H, W]:
    (x - b) * mean over alpha in linspace(0, 1, steps) of grad score(b + alpha (x - b)). All B * steps path points
    are evaluated in chunks of `batch_size`; gradients are summed in float64."""
    # numpy's linspace, as PAIR: torch.linspace rounds some points differently (by one ulp), which is enough to flip
    # a max-pool or ReLU tie on flat image regions and change that point's gradient
    alphas = torch.from_numpy(np.linspace(0, 1, steps)).to(device=x.device, dtype=x.dtype)
    count = baselines.shape[0] * steps
    totals = torch.zeros(baselines.shape, dtype=torch.float64, device=x.device)
    for start in range(0, count, batch_size):
        index = torch.arange(start, min(start + batch_size, count), device=x.device)
        which, alpha = index // steps, alphas[index % steps].view(-1, 1, 1, 1)
        points = (baselines[which] + alpha * (x - baselines[which])).detach().requires_grad_(True)
        (grads,) = torch.autograd.grad(score(points).sum(), points)
        totals.index_add_(0, which, grads.to(torch.float64))
    return (x - baselines).to(torch.float64) * totals / steps


def xrai(model: nn.Module, x: Tensor, targets: Sequence[int], steps: int, fast: bool, mean: Sequence[float],
         std: Sequence[float], image: np.ndarray, batch_size: int | None = None) -> XRAIResult:
    """XRAI of normalised image `x` [3, H, W] for each target; `image` is the [H, W, 3] picture segmented."""
    device = x.device
    m = torch.tensor(mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    pixels = (x[None] * s + m)[0]  # the model's input before normalisation: PAIR works in this space
    baselines = torch.stack([torch.full_like(pixels, float(pixels.min())),
                             torch.full_like(pixels, float(pixels.max()))])
    chunk = batch_size or path_batch_size(model, x[None], 1, 2 * steps)  # both baselines' points share the passes

    start = time.perf_counter()
    igs, errors = [], []
    for target in targets:
        def score(points: Tensor, target: int = target) -> Tensor:
            return model((points - m) / s)[:, target]

        def run(points: int, score: Callable[[Tensor], Tensor] = score) -> Tensor:
            return pair_integrated_gradients(score, pixels, baselines, steps, points)

        if batch_size:  # the caller's choice is kept, out of memory or not
            ig = run(chunk)
        else:
            ig, chunk = fitting_path_batch(run, chunk, model, x[None], 1, 2 * steps)
        with torch.no_grad():
            gap = score(pixels[None])[0] - score(baselines)
        errors.append([float(e) for e in ((ig.sum(dim=(1, 2, 3)) - gap) / gap.abs().clamp_min(1e-12)).abs()])
        igs.append(ig)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gradient_seconds = time.perf_counter() - start

    start = time.perf_counter()
    masks = segment_masks(image.astype(np.float64), device=device)
    gains, ranks = [], []
    for ig in igs:
        attr = ig.mean(dim=0).max(dim=0).values  # mean over the baselines, then PAIR's signed max over channels
        regions = select_regions(attr, masks, fast=fast)
        gains.append(regions.gains)
        ranks.append(regions.ranks)
    region_seconds = time.perf_counter() - start
    empty = torch.zeros(0, *x.shape[1:], dtype=torch.float64)
    return XRAIResult(
        gains=torch.stack(gains).cpu() if gains else empty,
        ranks=torch.stack(ranks).cpu() if ranks else empty.long(),
        ig=torch.stack(igs).cpu() if igs else torch.zeros(0, 2, *x.shape),
        completeness_error=errors, gradient_seconds=gradient_seconds, region_seconds=region_seconds,
        segments=int(masks.shape[0]), internal_batch_size=chunk,
    )
