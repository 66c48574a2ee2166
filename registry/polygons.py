"""Object masks as polygons in the cloud's form: each part of a mask outlined by one ring of normalised x, y pairs,
simplified (scikit-image) until the rings hold at most a given number of points."""

from __future__ import annotations

import numpy as np

MIN_PART_PIXELS = 4  # a sliver of an object (left between others, or a stray pixel of a predicted mask) is not outlined
POLYGON_TOLERANCE_PX = 0.5  # how far a simplified outline may stray from the mask's, at first
TOLERANCE_GROWTH = 1.5  # the tolerance's step while the rings hold too many points
MIN_RING_POINTS = 6  # with too few points for every part, the smallest parts go first, so each kept one keeps this many


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The outline of each part of `mask` as (row, column) points in pixel-centre coordinates, largest part first."""
    from skimage.measure import find_contours, label  # here: a worker serving classifiers never imports them

    parts = label(mask, connectivity=1)
    sizes = np.bincount(parts.ravel())[1:]
    outlines = []
    for part in np.argsort(-sizes, kind="stable") + 1:
        if sizes[part - 1] < MIN_PART_PIXELS:
            break
        contours = find_contours(np.pad((parts == part).astype(np.float32), 1), 0.5)
        outlines.append(max(contours, key=len) - 1.0)  # undo the padding
    return outlines


def _simplified(outline: np.ndarray, tolerance: float) -> np.ndarray:
    """`outline` (closed: its last point repeats its first) simplified, keeping at least a triangle."""
    from skimage.measure import approximate_polygon

    ring = approximate_polygon(outline, tolerance)[:-1]
    if len(ring) >= 3:
        return ring
    return outline[np.linspace(0, len(outline) - 1, 3, endpoint=False).astype(int)]


def mask_polygons(mask: np.ndarray, max_points: int | None = None) -> tuple[tuple[float, ...], ...]:
    """The outline of each part of `mask` (an object cut in two by a shape drawn over it has two) as flat normalised
    lists x1, y1, x2, y2, ..., largest first; a pixel spans [i, i + 1), so an outline runs between the object's pixels
    and the background's. Parts of fewer than MIN_PART_PIXELS are left out. With `max_points`, the outlines are
    simplified further until all of them together hold at most that many points; when the parts are too many for
    MIN_RING_POINTS each, the smallest are dropped first."""
    height, width = mask.shape
    outlines = _outlines(np.asarray(mask, dtype=bool))
    tolerance = POLYGON_TOLERANCE_PX
    rings = [_simplified(outline, tolerance) for outline in outlines]
    if max_points is not None and sum(len(ring) for ring in rings) > max_points:
        outlines = outlines[:max(1, max_points // MIN_RING_POINTS)]
        while True:
            rings = [_simplified(outline, tolerance) for outline in outlines]
            if sum(len(ring) for ring in rings) <= max_points:
                break
            tolerance *= TOLERANCE_GROWTH
    polygons = []
    for ring in rings:
        xs = np.clip((ring[:, 1] + 0.5) / width, 0.0, 1.0)
        ys = np.clip((ring[:, 0] + 0.5) / height, 0.0, 1.0)
        polygons.append(tuple(float(round(v, 6)) for pair in zip(xs, ys) for v in pair))
    return tuple(polygons)
