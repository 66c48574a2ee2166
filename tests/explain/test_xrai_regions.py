"""XRAI's region stage against the reference implementation (PAIR `saliency.core.xrai`): the same masks, the same
greedy choices (full and fast), bit for bit up to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency.core import xrai as reference

from explain.xrai_regions import segment_masks, select_regions
from training.shapes import ShapesConfig, make_sample


@pytest.fixture(scope="module")
def shapes_image() -> np.ndarray:
    sample = make_sample(ShapesConfig(image_size=112, seed=4), 7)
    return np.asarray(sample.image.convert("RGB"), dtype=np.float64)


def test_segments_equal_the_reference(shapes_image: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    for image in (shapes_image, rng.uniform(0, 255, (60, 84, 3))):
        expected = reference._get_segments_felzenszwalb(image)
        ours = segment_masks(image)
        assert ours.shape[0] == len(expected)
        assert all(np.array_equal(mask, ours[i].numpy()) for i, mask in enumerate(expected))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("area_threshold, min_pixel_diff", [(1.0, 50), (0.2, 50), (1.0, 1)])
def test_region_selection_equals_the_reference(shapes_image: np.ndarray, fast: bool, area_threshold: float,
                                               min_pixel_diff: int) -> None:
    masks = reference._get_segments_felzenszwalb(shapes_image)
    attr = np.random.default_rng(2).normal(size=shapes_image.shape[:2])
    select = reference.XRAI._xrai_fast if fast else reference.XRAI._xrai
    expected_gains, expected_ranks = select(attr=attr, segs=masks, area_perc_th=area_threshold,
                                            min_pixel_diff=min_pixel_diff)
    ours = select_regions(torch.from_numpy(attr), torch.from_numpy(np.stack(masks)), fast=fast,
                          area_threshold=area_threshold, min_pixel_diff=min_pixel_diff)
    np.testing.assert_allclose(ours.gains.numpy(), expected_gains, rtol=0, atol=1e-12)
    assert np.array_equal(ours.ranks.numpy(), expected_ranks)
    assert ours.ranks.min() == 1
    if not fast:  # the sum property of the full algorithm: region gains x areas add up to the attribution
        assert ours.gains.sum().item() == pytest.approx(attr.sum(), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("fast", [False, True])
def test_ties_resolve_like_the_reference(fast: bool) -> None:
    masks = np.zeros((4, 30, 30), dtype=bool)
    masks[0, :15], masks[1, 15:], masks[2, :, :15], masks[3] = True, True, True, True
    attr = np.full((30, 30), 0.5)
    select = reference.XRAI._xrai_fast if fast else reference.XRAI._xrai
    expected_gains, expected_ranks = select(attr=attr, segs=list(masks), min_pixel_diff=50)
    ours = select_regions(torch.from_numpy(attr), torch.from_numpy(masks), fast=fast)
    assert np.array_equal(ours.ranks.numpy(), expected_ranks)
    np.testing.assert_allclose(ours.gains.numpy(), expected_gains, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["full", "fast"])
def test_end_to_end_with_the_same_base_attribution(shapes_image: np.ndarray, algorithm: str) -> None:
    base = np.random.default_rng(3).normal(size=shapes_image.shape)
    parameters = reference.XRAIParameters(algorithm=algorithm)
    expected = reference.XRAI().GetMask(shapes_image, call_model_function=None, base_attribution=base,
                                        extra_parameters=parameters)
    ours = select_regions(torch.from_numpy(base.max(axis=-1)), segment_masks(shapes_image), fast=algorithm == "fast")
    np.testing.assert_allclose(ours.gains.numpy(), expected, rtol=0, atol=1e-12)


def test_bad_min_pixel_diff_is_refused() -> None:
    with pytest.raises(ValueError, match="min_pixel_diff must be at least 1"):
        select_regions(torch.zeros(4, 4), torch.ones(1, 4, 4, dtype=torch.bool), fast=False, min_pixel_diff=0)
