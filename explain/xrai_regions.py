"""XRAI's region stage on torch: Felzenszwalb over-segmentation (exactly PAIR's calls, on the CPU with scikit-image),
segment dilation, and the greedy region selection, vectorised.

The reference (`saliency.core.xrai`, Apache-2.0) recomputes every remaining mask's gain over the whole image in each
pass of a Python loop: O(masks^2 x pixels). Here the masks are one [M, P] boolean tensor, read once into each mask's
pixel list and each pixel's mask list. Every mask's count and sum of not-yet-covered attribution are kept up to
date, so all gains are one division; adding a mask subtracts only the newly covered pixels' entries, so every
(mask, pixel) entry is visited once: O(masks x pixels) in all, on the GPU when there is one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from explain.cpu_threads import region_threads

FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_RESIZE = (224, 224)
FELZENSZWALB_MIN_SIZE = 150
DILATION_RADIUS = 5
MIN_PIXEL_DIFF = 50


def _normalized(image: np.ndarray) -> np.ndarray:
    """PAIR's `_normalize_image`: global min/max to [-1, 1], then a cubic resize to 224 x 224."""
    from skimage.transform import resize  # scikit-image where XRAI runs: a serving worker starts without it

    low, high = np.min(image), np.max(image)
    scaled = (image - low) / (high - low) * 2.0 - 1.0
    return resize(scaled, FELZENSZWALB_RESIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)


def _scale_masks(prepared: np.ndarray, scale: int, size: tuple[int, int]) -> np.ndarray:
    """The dilated masks of one Felzenszwalb scale, as PAIR makes them."""
    from skimage import segmentation
    from skimage.transform import resize

    labels = segmentation.felzenszwalb(prepared, scale=scale, sigma=FELZENSZWALB_SIGMA, min_size=FELZENSZWALB_MIN_SIZE)
    labels = resize(labels, size, order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(np.int64)
    return dilated_label_masks(labels - labels.min(), DILATION_RADIUS)


def segment_masks(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """[M, H, W] bool masks of `image` (H x W x C, any value range), in PAIR's order: for each Felzenszwalb scale,
    one mask per label value (empty ones included), each dilated by a radius-5 disk. The six scales are segmented
    and dilated in parallel threads (scikit-image and NumPy release the GIL there), as many as the calling thread
    runs torch on (explain/cpu_threads.py)."""
    height, width = image.shape[:2]
    prepared = _normalized(image.astype(np.float64))
    with ThreadPoolExecutor(max_workers=region_threads(len(FELZENSZWALB_SCALES))) as pool:
        per_scale = list(pool.map(lambda scale: _scale_masks(prepared, scale, (height, width)), FELZENSZWALB_SCALES))
    return torch.from_numpy(np.concatenate(per_scale)).to(device)


def dilated_label_masks(labels: np.ndarray, radius: int) -> np.ndarray:
    """One mask per label value 0..max of an [H, W] label map, each dilated by a disk of `radius` with zero padding
    (what scikit-image's `dilation` does to each mask): pixel p joins label l's mask when a pixel within the disk
    around p has label l.

    Only pixel pairs with different labels matter, and a pair at offset d is the pair at -d seen from the other
    end, so half the disk's offsets are compared. In a copy of the labels padded by `radius` (label -1) and read
    as one flat array, an offset is a constant shift of the flat index: each comparison is one pass over two
    slices, and the pairs that differ are scattered into masks laid out on the padded grid, cropped at the end."""
    from skimage.morphology import disk

    height, width = labels.shape
    padded_width = width + 2 * radius
    padded_pixels = (height + 2 * radius) * padded_width
    padded = np.full((height + 2 * radius, padded_width), -1, dtype=np.int64)
    padded[radius:radius + height, radius:radius + width] = labels
    masks = np.zeros((int(labels.max()) + 1, height + 2 * radius, padded_width), dtype=bool)
    rows, cols = np.indices(labels.shape)
    masks[labels, rows + radius, cols + radius] = True
    flat_masks, flat_labels = masks.reshape(-1), padded.reshape(-1)
    start = radius * padded_width + radius  # the first image pixel on the padded grid
    span = (height - 1) * padded_width + width  # to the last one
    here = flat_labels[start:start + span]
    for dy, dx in (np.argwhere(disk(radius)) - radius).tolist():
        if (dy, dx) <= (0, 0):  # the other half of the disk is the same pairs, seen from the other end
            continue
        shift = dy * padded_width + dx
        there = flat_labels[start + shift:start + shift + span]
        index = np.flatnonzero(here != there)
        label_here, label_there = here[index], there[index]
        real = (label_here >= 0) & (label_there >= 0)  # not padding
        index, label_here, label_there = index[real] + start, label_here[real], label_there[real]
        flat_masks[label_there * padded_pixels + index] = True
        flat_masks[label_here * padded_pixels + index + shift] = True
    return masks[:, radius:radius + height, radius:radius + width].copy()


@dataclass(frozen=True)
class _MaskPixels:
    """Each mask's pixels, ascending (as the boolean mask reads them): `pixels[starts[m]:starts[m + 1]]`."""

    pixels: torch.Tensor  # [nnz]
    starts: torch.Tensor  # [M + 1]

    @classmethod
    def of(cls, flat_masks: torch.Tensor) -> _MaskPixels:
        which, pixel = torch.nonzero(flat_masks, as_tuple=True)
        starts = torch.zeros(flat_masks.shape[0] + 1, dtype=torch.long, device=flat_masks.device)
        torch.cumsum(torch.bincount(which, minlength=flat_masks.shape[0]), 0, out=starts[1:])
        return cls(pixel, starts)

    def __getitem__(self, mask: int) -> torch.Tensor:
        return self.pixels[int(self.starts[mask]):int(self.starts[mask + 1])]


def _masks_of_pixels(flat_masks: torch.Tensor) -> torch.Tensor:
    """[P, K]: the masks holding each pixel, padded with M (one past the last mask)."""
    count, pixels = flat_masks.shape
    pixel, mask = torch.nonzero(flat_masks.t(), as_tuple=True)  # grouped by pixel
    per_pixel = torch.bincount(pixel, minlength=pixels)
    first = torch.cumsum(per_pixel, 0) - per_pixel
    table = torch.full((pixels, int(per_pixel.max()) if pixels else 0), count, dtype=torch.long,
                       device=flat_masks.device)
    table[pixel, torch.arange(len(pixel), device=flat_masks.device) - first[pixel]] = mask
    return table


@dataclass(frozen=True)
class RegionResult:
    """XRAI's output: per-pixel region gains (float64 [H, W]) and region ranks (int [H, W], 1 = most important)."""

    gains: torch.Tensor
    ranks: torch.Tensor


def _finish(out: torch.Tensor, attr: torch.Tensor, trace: list[tuple[torch.Tensor, float]],
            shape: torch.Size) -> RegionResult:
    """Fill the pixels no region covered with their mean attribution (PAIR's completeness rule) and rank the regions:
    1 for the highest gain (a stable sort, as PAIR), the leftover region last. `trace` holds each added region's
    pixel indices and gain."""
    leftover = torch.isinf(out) & (out < 0)
    if leftover.any():
        out[leftover] = attr[leftover].mean()
    ranks = torch.zeros(out.shape, dtype=torch.long, device=out.device)
    order = sorted(range(len(trace)), key=lambda i: -trace[i][1])
    for rank, index in enumerate(order, start=1):
        ranks[trace[index][0]] = rank
    ranks[leftover] = len(order) + 1
    return RegionResult(out.reshape(shape), ranks.reshape(shape))


NEAR_TIE = 1e-9  # relative: incrementally updated sums are this close to exact ones, by far


def _settle_near_ties(gains: torch.Tensor, mask_pixels: _MaskPixels, covered: torch.Tensor, flat_attr: torch.Tensor
                      ) -> tuple[int, float]:
    """The mask to add: the first maximum of `gains`. Masks whose incrementally updated gain is within NEAR_TIE of
    the maximum are re-scored exactly as PAIR does (the NumPy mean over their new pixels, ascending), so rounding in
    the running sums never changes which mask is chosen."""
    top = float(gains.max())
    close = torch.nonzero(gains >= top - NEAR_TIE * max(1.0, abs(top))).flatten().tolist()
    if len(close) == 1:
        return close[0], top
    attr_np, covered_np = flat_attr.cpu().numpy(), covered.cpu().numpy()
    best, best_gain = close[0], -np.inf
    for index in close:  # index order and a strict '>' keep the earliest of exact ties, as PAIR
        pixels = mask_pixels[index].cpu().numpy()
        gain = float(attr_np[pixels[~covered_np[pixels]]].mean())
        if gain > best_gain:
            best, best_gain = index, gain
    return best, best_gain


def select_regions(attr: torch.Tensor, masks: torch.Tensor, fast: bool, area_threshold: float = 1.0,
                   min_pixel_diff: int = MIN_PIXEL_DIFF) -> RegionResult:
    """Greedy region selection over [H, W] attributions `attr` (float64) and [M, H, W] `masks`.

    Full: repeatedly add the mask whose not-yet-covered pixels have the highest mean attribution (the earliest mask
    on a tie), dropping for good any mask that adds fewer than `min_pixel_diff` pixels, until the covered area exceeds
    `area_threshold` or no mask is left. Fast: rank the masks once by their whole-mask mean and add them in that
    order. Equal to PAIR's `XRAI._xrai` / `_xrai_fast`.

    Each mask's count and sum of not-yet-covered attribution are kept up to date: adding a mask subtracts only the
    newly covered pixels' entries, so every (mask, pixel) entry is visited once."""
    if min_pixel_diff < 1:
        raise ValueError("min_pixel_diff must be at least 1")
    attr = attr.to(torch.float64)
    shape = attr.shape
    flat_attr = attr.reshape(-1)
    flat_masks = masks.reshape(masks.shape[0], -1)
    mask_pixels = _MaskPixels.of(flat_masks)
    out = torch.full_like(flat_attr, -torch.inf)
    covered = torch.zeros(flat_attr.shape, dtype=torch.bool, device=flat_attr.device)
    trace: list[tuple[torch.Tensor, float]] = []
    if fast:
        # whole-mask means as PAIR computes them (NumPy, the mask's pixels in ascending order), so near-equal gains
        # sort in the same order
        values = flat_attr.cpu().numpy()[mask_pixels.pixels.cpu().numpy()]
        bounds = mask_pixels.starts.tolist()
        gains = torch.tensor([values[a:b].mean() if b > a else -np.inf for a, b in zip(bounds, bounds[1:])],
                             dtype=torch.float64)
        for index in torch.sort(gains, descending=True, stable=True).indices.tolist():
            pixels = mask_pixels[index]
            new = pixels[~covered[pixels]]
            if len(new) < min_pixel_diff:
                continue
            gain = float(flat_attr[new].mean())
            trace.append((new, gain))
            out[new] = gain
            covered[new] = True
        return _finish(out, flat_attr, trace, shape)

    count = masks.shape[0]  # the running sums hold one more entry, M: the padding of the pixel-to-masks table
    holders_of = _masks_of_pixels(flat_masks)
    which = torch.repeat_interleave(torch.arange(count, device=flat_attr.device), mask_pixels.starts.diff())
    counts = torch.bincount(which, minlength=count + 1).to(torch.float64)  # each mask's not-yet-covered pixels
    sums = torch.zeros_like(counts).index_add_(0, which, flat_attr[mask_pixels.pixels])  # and their attribution
    alive = torch.ones(count + 1, dtype=torch.bool, device=flat_attr.device)
    alive[count] = False
    covered_count, pixel_count = 0, flat_attr.numel()
    while covered_count / pixel_count <= area_threshold:  # PAIR's np.mean(current_mask)
        alive &= counts >= min_pixel_diff
        if not bool(alive.any()):
            break
        gains = torch.where(alive, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))
        best, gain = _settle_near_ties(gains, mask_pixels, covered, flat_attr)
        pixels = mask_pixels[best]
        new = pixels[~covered[pixels]]
        trace.append((new, gain))
        out[new] = gain
        covered[new] = True
        covered_count += len(new)
        alive[best] = False
        holders = holders_of[new]  # the newly covered pixels leave every mask's sums
        counts -= torch.bincount(holders.reshape(-1), minlength=count + 1).to(torch.float64)
        sums.index_add_(0, holders.reshape(-1), flat_attr[new, None].expand_as(holders).reshape(-1), alpha=-1)
    return _finish(out, flat_attr, trace, shape)
