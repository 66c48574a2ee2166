"""XRAI's region stage on torch: Felzenszwalb over-segmentation (exactly PAIR's calls, on the CPU with scikit-image),
segment dilation, and the greedy region selection, vectorised.

The reference (`saliency.core.xrai`, Apache-2.0) recomputes every remaining mask's gain over the whole image in each
pass of a Python loop: O(masks^2 x pixels). Here the masks are one [M, P] boolean tensor and each mask's count and sum
of not-yet-covered attribution are kept up to date: adding a mask subtracts only the newly covered pixels' columns,
so every pixel is visited once and the whole selection costs O(masks x pixels), on the GPU when there is one.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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


def _felzenszwalb_labels(prepared: np.ndarray, scale: int, size: tuple[int, int]) -> np.ndarray:
    labels = segmentation.felzenszwalb(prepared, scale=scale, sigma=FELZENSZWALB_SIGMA, min_size=FELZENSZWALB_MIN_SIZE)
    return resize(labels, size, order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(int)


def segment_masks(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """[M, H, W] bool masks of `image` (H x W x C, any value range), in PAIR's order: for each Felzenszwalb scale,
    one mask per label value (empty ones included), each dilated by a radius-5 disk. The six scales are segmented
    in parallel threads (scikit-image releases the GIL there)."""
    height, width = image.shape[:2]
    prepared = _normalized(image.astype(np.float64))
    with ThreadPoolExecutor(max_workers=min(len(FELZENSZWALB_SCALES), os.cpu_count() or 1)) as pool:
        label_maps = list(pool.map(lambda scale: _felzenszwalb_labels(prepared, scale, (height, width)),
                                   FELZENSZWALB_SCALES))
    return torch.cat([dilated_label_masks(torch.from_numpy(labels - labels.min()).to(device), DILATION_RADIUS)
                      for labels in label_maps])


def dilated_label_masks(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """One mask per label value 0..max of an [H, W] label map, each dilated by a disk of `radius` with zero padding
    (what scikit-image's `dilation` does to each mask): pixel p joins label l's mask when a pixel within the disk
    around p has label l. Only pixels near a label boundary have such neighbours, so the disk's offsets are compared
    at once and just those few pixels are scattered, instead of dilating every mask."""
    height, width = labels.shape
    pixels = height * width
    count = int(labels.max()) + 1
    offsets = [(dy, dx) for dy, dx in (torch.nonzero(torch.from_numpy(disk(radius))) - radius).tolist()
               if (dy, dx) != (0, 0)]
    small = labels.to(torch.int32)
    padded = F.pad(small[None, None].float(), (radius,) * 4, value=-1)[0, 0].to(torch.int32)
    windows = torch.stack([padded[radius - dy:radius - dy + height, radius - dx:radius - dx + width]
                           for dy, dx in offsets])  # the label at p - offset
    which, rows, cols = torch.nonzero((windows != small) & (windows >= 0), as_tuple=True)
    flat = torch.zeros(count * pixels, dtype=torch.bool, device=labels.device)
    flat[labels.reshape(-1).long() * pixels + torch.arange(pixels, device=labels.device)] = True
    flat[windows[which, rows, cols].long() * pixels + rows * width + cols] = True
    return flat.view(count, height, width)


def _mask_sums(flat_masks: torch.Tensor, flat_attr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each mask's pixel count and attribution sum (float64), from the masks' nonzero entries."""
    which, pixel = torch.nonzero(flat_masks, as_tuple=True)
    counts = torch.bincount(which, minlength=flat_masks.shape[0]).to(torch.float64)
    sums = torch.zeros(flat_masks.shape[0], dtype=torch.float64, device=flat_attr.device)
    return counts, sums.index_add_(0, which, flat_attr[pixel])


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


NEAR_TIE = 1e-9  # relative: incrementally updated sums are this close to exact ones, by far


def _settle_near_ties(gains: torch.Tensor, flat_masks: torch.Tensor, covered: torch.Tensor, flat_attr: torch.Tensor
                      ) -> tuple[int, float]:
    """The mask to add: the first maximum of `gains`. Masks whose incrementally updated gain is within NEAR_TIE of
    the maximum are re-scored exactly as PAIR does (the NumPy mean over their new pixels), so rounding in the
    running sums never changes which mask is chosen."""
    top = float(gains.max())
    close = torch.nonzero(gains >= top - NEAR_TIE * max(1.0, abs(top))).flatten().tolist()
    if len(close) == 1:
        return close[0], top
    attr_np, covered_np = flat_attr.cpu().numpy(), covered.cpu().numpy()
    best, best_gain = close[0], -np.inf
    for index in close:  # index order and a strict '>' keep the earliest of exact ties, as PAIR
        gain = float(attr_np[flat_masks[index].cpu().numpy() & ~covered_np].mean())
        if gain > best_gain:
            best, best_gain = index, gain
    return best, best_gain


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
        attr_np, masks_np = flat_attr.cpu().numpy(), flat_masks.cpu().numpy()
        # whole-mask means computed as PAIR does (NumPy), so near-equal gains sort in the same order
        gains = torch.tensor([attr_np[mask].mean() if mask.any() else -np.inf for mask in masks_np],
                             dtype=torch.float64)
        for index in torch.sort(gains, descending=True, stable=True).indices.tolist():
            new = flat_masks[index] & ~covered
            if int(new.sum()) < min_pixel_diff:
                continue
            gain = float(flat_attr[new].mean())
            trace.append((new.reshape(shape), gain))
            out[new] = gain
            covered |= flat_masks[index]
        return _finish(out.reshape(shape), attr, trace)

    counts, sums = _mask_sums(flat_masks, flat_attr)  # each mask's not-yet-covered pixels and their attribution
    alive = torch.ones(flat_masks.shape[0], dtype=torch.bool, device=flat_masks.device)
    area = 0.0
    while area <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not bool(alive.any()):
            break
        gains = torch.where(alive, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))
        best, gain = _settle_near_ties(gains, flat_masks, covered, flat_attr)
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
