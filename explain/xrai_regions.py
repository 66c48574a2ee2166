"""XRAI's region stage on torch: Felzenszwalb over-segmentation (exactly PAIR's calls, on the CPU with scikit-image),
segment dilation, and the greedy region selection, vectorised.

The reference (`saliency.core.xrai`, Apache-2.0) recomputes every remaining mask's gain over the whole image in each
pass of a Python loop: O(masks^2 x pixels). Here the masks are one [M, P] boolean tensor and each mask's count and sum
of not-yet-covered attribution are kept up to date: adding a mask subtracts only the newly covered pixels' columns,
so every pixel is visited once and the whole selection costs O(masks x pixels), on the GPU when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage import segmentation
from skimage.morphology import disk
from skimage.transform import resize

FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_RESIZE = (224, 224)
FELZENSZWALB_MIN_SIZE = 150
DILATION_RADIUS = 5
MIN_PIXEL_DIFF = 50


def _normalized(image: np.ndarray) -> np.ndarray:
    """PAIR's `_normalize_image`: global min/max to [-1, 1], then a cubic resize to 224 x 224."""
    low, high = np.min(image), np.max(image)
    scaled = (image - low) / (high - low) * 2.0 - 1.0
    return resize(scaled, FELZENSZWALB_RESIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)


def segment_masks(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """[M, H, W] bool masks of `image` (H x W x C, any value range), in PAIR's order: for each Felzenszwalb scale,
    one mask per label value (empty ones included), each dilated by a radius-5 disk."""
    height, width = image.shape[:2]
    prepared = _normalized(image.astype(np.float64))
    masks = []
    for scale in FELZENSZWALB_SCALES:
        labels = segmentation.felzenszwalb(prepared, scale=scale, sigma=FELZENSZWALB_SIGMA,
                                           min_size=FELZENSZWALB_MIN_SIZE)
        labels = resize(labels, (height, width), order=0, preserve_range=True, mode="constant",
                        anti_aliasing=False).astype(int)
        values = torch.from_numpy(labels).to(device)
        levels = torch.arange(int(labels.min()), int(labels.max()) + 1, device=device)
        masks.append(values[None] == levels[:, None, None])
    return dilate(torch.cat(masks), DILATION_RADIUS)


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of [M, H, W] masks by a disk (zero padding: the same as scikit-image's `dilation` here)."""
    if radius <= 0:
        return masks
    footprint = torch.from_numpy(disk(radius).astype(np.float32)).to(masks.device)[None, None]
    spread = F.conv2d(masks[:, None].float(), footprint, padding=radius)
    return spread[:, 0] > 0.5


@dataclass(frozen=True)
class RegionResult:
    """XRAI's output: per-pixel region gains (float64 [H, W]) and region ranks (int [H, W], 1 = most important)."""

    gains: torch.Tensor
    ranks: torch.Tensor


def _ranks(trace: list[tuple[torch.Tensor, float]], leftover: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Rank 1 for the highest-gain region (a stable sort by gain, as PAIR), the leftover region last."""
    order = sorted(range(len(trace)), key=lambda i: -trace[i][1])
    ranks = torch.zeros(shape, dtype=torch.long, device=leftover.device)
    for rank, index in enumerate(order, start=1):
        ranks[trace[index][0]] = rank
    if leftover.any():
        ranks[leftover] = len(order) + 1
    return ranks


def _finish(out: torch.Tensor, attr: torch.Tensor, trace: list[tuple[torch.Tensor, float]]) -> RegionResult:
    leftover = torch.isinf(out) & (out < 0)
    if leftover.any():
        out[leftover] = attr[leftover].mean()
    return RegionResult(out, _ranks(trace, leftover, out.shape))


def select_regions(attr: torch.Tensor, masks: torch.Tensor, fast: bool, area_threshold: float = 1.0,
                   min_pixel_diff: int = MIN_PIXEL_DIFF) -> RegionResult:
    """Greedy region selection over [H, W] attributions `attr` (float64) and [M, H, W] `masks`.

    Full: repeatedly add the mask whose not-yet-covered pixels have the highest mean attribution (the earliest mask
    on a tie), dropping for good any mask that adds fewer than `min_pixel_diff` pixels, until the covered area exceeds
    `area_threshold` or no mask is left. Fast: rank the masks once by their whole-mask mean and add them in that
    order. Equal to PAIR's `XRAI._xrai` / `_xrai_fast`."""
    if min_pixel_diff < 1:
        raise ValueError("min_pixel_diff must be at least 1")
    attr = attr.to(torch.float64)
    shape = attr.shape
    flat_attr = attr.reshape(-1)
    flat_masks = masks.reshape(masks.shape[0], -1)
    out = torch.full_like(flat_attr, -torch.inf)
    covered = torch.zeros_like(flat_masks[0])
    trace: list[tuple[torch.Tensor, float]] = []
    if fast:
        counts = flat_masks.sum(1)
        sums = flat_masks.to(torch.float64) @ flat_attr
        gains = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))
        for index in torch.sort(gains, descending=True, stable=True).indices.tolist():
            new = flat_masks[index] & ~covered
            if int(new.sum()) < min_pixel_diff:
                continue
            gain = float(flat_attr[new].mean())
            trace.append((new.reshape(shape), gain))
            out[new] = gain
            covered |= flat_masks[index]
        return _finish(out.reshape(shape), attr, trace)

    counts = flat_masks.sum(1).to(torch.float64)  # not-yet-covered pixels of each mask
    sums = flat_masks.to(torch.float64) @ flat_attr  # and their attribution
    alive = torch.ones(flat_masks.shape[0], dtype=torch.bool, device=flat_masks.device)
    area = 0.0
    while area <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not bool(alive.any()):
            break
        gains = torch.where(alive, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))
        best = int(torch.argmax(gains))  # the first of equal maxima, as PAIR's strict '>'
        gain = float(gains[best])
        new = flat_masks[best] & ~covered
        trace.append((new.reshape(shape), gain))
        out[new] = gain
        covered |= flat_masks[best]
        area = float(covered.to(torch.float64).mean())
        alive[best] = False
        columns = flat_masks[:, new].to(torch.float64)  # the newly covered pixels leave every other mask's sums
        counts -= columns.sum(1)
        sums -= columns @ flat_attr[new]
    return _finish(out.reshape(shape), attr, trace)
