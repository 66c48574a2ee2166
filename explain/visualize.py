"""The 2 x 2 explanation PNG users expect (SPEC.md section 4).

(0,0) the cropped input; (0,1) the attribution heat map on the bgyw scale (blue-green-yellow-white, white = highest
contribution); (1,0) the heat map blended over the input; (1,1) the input keeping only its top 30 % pixels.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from PIL import Image

BGYW = LinearSegmentedColormap.from_list("bgyw", ["#0000ff", "#00a000", "#ffff00", "#ffffff"])
TOP_FRACTION = 0.30
OUTLIER_MASS = 0.02  # like captum's outlier_perc=2: the top values holding 2 % of the total saturate
MIN_PANEL = 224  # small crops are enlarged (nearest neighbour) so the grid stays readable


def pixel_scores(attributions: np.ndarray, signed_regions: bool = False) -> np.ndarray:
    """[3, H, W] attributions -> [H, W] scores in [0, 1], higher = more important.

    Gradient methods: |sum over channels|, saturating the outliers. XRAI (`signed_regions`): its region gains
    (equal across channels) scaled min-max, so a low-gain region stays low even if negative."""
    if signed_regions:
        gains = attributions.max(axis=0).astype(np.float64)
        span = gains.max() - gains.min()
        return (gains - gains.min()) / span if span > 0 else np.zeros_like(gains)
    scores = np.abs(attributions.sum(axis=0)).astype(np.float64)
    total = scores.sum()
    if total <= 0:
        return np.zeros_like(scores)
    ordered = np.sort(scores.ravel())[::-1]
    cutoff_index = int(np.searchsorted(np.cumsum(ordered), total * OUTLIER_MASS))
    cutoff = ordered[min(cutoff_index, len(ordered) - 1)]
    return np.clip(scores / cutoff, 0, 1) if cutoff > 0 else scores / scores.max()


def render_grid(image: np.ndarray, scores: np.ndarray) -> Image.Image:
    """The 2 x 2 grid for an [H, W, 3] uint8 image and [H, W] scores in [0, 1]."""
    heat = (BGYW(scores)[..., :3] * 255).astype(np.uint8)
    blended = (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32)).astype(np.uint8)
    threshold = np.quantile(scores, 1 - TOP_FRACTION)
    keep = scores >= threshold if scores.max() > 0 else np.zeros_like(scores, dtype=bool)
    masked = np.where(keep[..., None], image, 0).astype(np.uint8)
    height, width = scores.shape
    factor = max(1, math.ceil(MIN_PANEL / min(height, width)))
    panels = [Image.fromarray(p).resize((width * factor, height * factor), Image.NEAREST)
              for p in (image, heat, blended, masked)]
    grid = Image.new("RGB", (2 * width * factor, 2 * height * factor))
    for index, panel in enumerate(panels):
        grid.paste(panel, ((index % 2) * width * factor, (index // 2) * height * factor))
    return grid


def png_bytes(grid: Image.Image) -> bytes:
    """The grid as PNG at zlib's default level. `optimize=True` (zlib's level 9 and a second pass) took 2-8x as long
    (guided backprop at 224 px: 155 vs 52 ms, as long as the explanation itself) for files at most 2.4 % smaller."""
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
