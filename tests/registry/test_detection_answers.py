"""The parts of a detector's answer that do not need a model: polygons from masks, the tiles an image is cut into,
and the answer's form from raw detections."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk, polygon2mask

from registry.detection_answers import RawDetections, detection_answer
from registry.detection_inference import tiles
from registry.polygons import mask_polygons
from registry.settings import build_settings


def test_a_square_is_outlined_by_its_four_corners() -> None:
    mask = np.zeros((20, 40), bool)
    mask[5:15, 10:30] = True
    (ring,) = mask_polygons(mask)
    corners = np.array(sorted(zip(ring[0::2], ring[1::2]))) * [40, 20]  # in pixels
    expected = np.array(sorted([(10, 5), (30, 5), (30, 15), (10, 15)]))
    # marching squares cuts each corner by half a pixel
    assert corners.shape == (4, 2) and np.abs(corners - expected).max() <= 0.5


@pytest.mark.parametrize(("max_points", "least_iou"), [(3, 0.35), (8, 0.6), (16, 0.85), (40, 0.9)])
def test_polygons_keep_to_the_most_points_and_stay_on_the_mask(max_points: int, least_iou: float) -> None:
    """A triangle in a disk covers 41 % of it, a pentagon 76 %: few points outline coarsely, never off the mask."""
    mask = np.zeros((100, 100), bool)
    mask[disk((40, 40), 25)] = True
    mask[disk((85, 85), 8)] = True  # a second part
    rings = mask_polygons(mask, max_points)
    assert sum(len(ring) // 2 for ring in rings) <= max_points
    drawn = np.zeros_like(mask)
    for ring in rings:
        points = np.asarray(ring).reshape(-1, 2) * 100 - 0.5
        drawn |= polygon2mask(mask.shape, points[:, ::-1])
    assert (drawn & mask).sum() / (drawn | mask).sum() > least_iou
    assert (drawn & ~mask).sum() <= 0.05 * drawn.sum()
    assert len(rings) == (1 if max_points < 12 else 2)  # too few points for both parts: the small one goes
    assert len(mask_polygons(mask)) == 2 and sum(len(r) // 2 for r in mask_polygons(mask)) > 30


@pytest.mark.parametrize(("grid", "overlap"), [((1, 1), 0.25), ((3, 2), 0.25), ((2, 2), 0.0), ((4, 3), 0.5)])
def test_tiles_cover_the_image_with_the_overlap_asked_for(grid: tuple[int, int], overlap: float) -> None:
    width, height = 301, 200
    cut = tiles(width, height, grid, overlap)
    assert len(cut) == grid[0] * grid[1]
    covered = np.zeros((height, width), int)
    for x0, y0, x1, y1 in cut:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    side = width / (grid[0] - (grid[0] - 1) * overlap)  # neighbours share `overlap` of a tile's width
    assert all(x1 - x0 == pytest.approx(side, abs=1) for x0, _, x1, _ in cut)
    starts = sorted({x0 for x0, _, _, _ in cut})
    assert all(b - a == pytest.approx(side * (1 - overlap), abs=1) for a, b in zip(starts, starts[1:]))


def test_an_answer_is_normalised_sorted_and_carries_what_the_settings_ask() -> None:
    masks = np.zeros((2, 50, 100), np.float32)
    masks[0, 10:20, 10:30] = 0.9
    masks[1, 30:40, 60:90] = 0.4  # below the pixel threshold of 0.5 but for a few pixels
    masks[1, 32:36, 62:70] = 0.8
    raw = RawDetections(boxes=np.array([[10, 10, 30, 20], [60, 30, 90, 40]], np.float32),
                        scores=np.array([0.4, 0.9], np.float32), classes=np.array([2, 1]), masks=masks)
    boxes = detection_answer(raw, ["circle", "square"], 100, 50, build_settings("object_detection")).boxes
    assert [(b.label, b.score) for b in boxes] == [("circle", pytest.approx(0.9)), ("square", pytest.approx(0.4))]
    assert boxes[0].box.model_dump() == pytest.approx({"topX": 0.6, "topY": 0.6, "bottomX": 0.9, "bottomY": 0.8})
    assert boxes[0].polygon is None and boxes[0].mask is None  # detection: no masks in the answer

    settings = build_settings("instance_segmentation", {"export_as_image": True, "image_type": "BMP"})
    boxes = detection_answer(raw, ["circle", "square"], 100, 50, settings).boxes
    xs = boxes[0].polygon[0][0::2]
    assert min(xs) == pytest.approx(0.62, abs=0.01) and max(xs) == pytest.approx(0.70, abs=0.01)
    image = Image.open(io.BytesIO(base64.b64decode(boxes[1].mask)))
    assert (image.format, image.size) == ("BMP", (100, 50))
    assert (np.asarray(image) > 127).sum() == 200


def test_a_detection_of_the_background_slot_names_no_label() -> None:
    """A RetinaNet has no background class: untrained, it may score class 0, which is no label (not the last one)."""
    raw = RawDetections(np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32), np.array([0.9, 0.6], np.float32),
                        np.array([0, 2]), None)
    answer = detection_answer(raw, ["circle", "square", "triangle"], 40, 40, build_settings("object_detection", {}))
    assert [(found.label, found.score) for found in answer.boxes] == [("square", pytest.approx(0.6))]
