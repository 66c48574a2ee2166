"""XRAI end to end against the reference (PAIR `saliency.core.XRAI`) on the same model and image, and PAIR's IG rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from saliency.core import xrai as reference
from saliency.core.base import INPUT_OUTPUT_GRADIENTS
from saliency.core.integrated_gradients import IntegratedGradients as ReferenceIG
from scipy.stats import spearmanr

from explain.attribute import attribute
from explain.xrai import pair_integrated_gradients
from registry.small_cnn import SmallCNN
from registry.spec import IMAGENET, IMAGENET_MEAN, IMAGENET_STD
from training.shapes import ShapesConfig, make_sample

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(3).eval().double()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.asarray(make_sample(ShapesConfig(image_size=64, seed=2), 1).image.convert("RGB"))


def reference_gradients(model: torch.nn.Module, target: int):
    """PAIR's call_model_function: the gradient of the target logit with respect to HWC pixels in [0, 1]."""
    def call(batch, call_model_args=None, expected_keys=None):  # noqa: ANN001, ANN202
        pixels = torch.from_numpy(np.asarray(batch)).permute(0, 3, 1, 2).requires_grad_(True)
        (grads,) = torch.autograd.grad(model((pixels - MEAN) / STD)[:, target].sum(), pixels)
        return {INPUT_OUTPUT_GRADIENTS: grads.permute(0, 2, 3, 1).numpy()}
    return call


@pytest.mark.parametrize("algorithm", ["full", "fast"])
def test_xrai_matches_the_reference(model: SmallCNN, picture: np.ndarray, algorithm: str,
                                    capsys: pytest.CaptureFixture) -> None:
    pixels = torch.from_numpy(picture).permute(2, 0, 1).double() / 255
    ours = attribute(model, (pixels - MEAN) / STD, "xrai", {"n_steps": 20, "xrai_fast": algorithm == "fast"},
                     image=picture, **IMAGENET)
    expected = reference.XRAI().GetMask(picture.astype(np.float64) / 255, reference_gradients(model, ours.targets[0]),
                                        batch_size=16, extra_parameters=reference.XRAIParameters(
                                            steps=20, algorithm=algorithm))
    gains = ours.attributions[0, 0].numpy()
    correlation = spearmanr(gains.ravel(), expected.ravel())[0]
    with capsys.disabled():
        print(f"\nXRAI {algorithm} vs saliency.core.XRAI: Spearman {correlation:.4f}, "
              f"max abs difference {np.abs(gains - expected).max():.2e}")
    assert correlation >= 0.99
    assert np.allclose(gains, expected, rtol=1e-3, atol=1e-5)
    assert torch.equal(ours.attributions[0, 0], ours.attributions[0, 2])  # one gain per pixel, on every channel
    report = ours.fidelity
    assert report.segments > 0 and set(report.stage_seconds) == {"gradients", "regions"}
    assert len(report.baseline_completeness_error[0]) == 2
    assert ours.visualization_png()[:4] == b"\x89PNG"


def test_pair_integrated_gradients_equals_the_reference_for_any_batch_size(picture: np.ndarray) -> None:
    # a smooth model: with ReLU and max-pool, a one-ulp difference between memory layouts (PAIR hands torch a
    # channels-last view) flips ties on flat regions and moves single gradients, which says nothing about the rule
    torch.manual_seed(3)
    smooth = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(4),
                                 torch.nn.Flatten(), torch.nn.LazyLinear(3)).double()
    pixels = torch.from_numpy(picture).permute(2, 0, 1).double() / 255
    smooth(pixels[None])
    baselines = torch.stack([torch.zeros_like(pixels), torch.ones_like(pixels)])

    def score(points: torch.Tensor) -> torch.Tensor:
        return smooth((points - MEAN) / STD)[:, 1]

    ours = pair_integrated_gradients(score, pixels, baselines, 12, batch_size=5)
    assert torch.allclose(ours, pair_integrated_gradients(score, pixels, baselines, 12, batch_size=24),
                          rtol=1e-9, atol=1e-15)
    hwc = pixels.permute(1, 2, 0).numpy()
    for index, baseline in enumerate(baselines):
        expected = ReferenceIG().GetMask(hwc, reference_gradients(smooth, 1), x_baseline=baseline.permute(1, 2, 0)
                                         .numpy(), x_steps=12, batch_size=4)
        # PAIR sums the gradients in float32 (`total_gradients`), Lantern in float64: equal to float32 precision
        np.testing.assert_allclose(ours[index].permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-9)


def test_xrai_gives_one_map_per_chosen_label(model: SmallCNN, picture: np.ndarray) -> None:
    """Targets chosen from the logits by the caller's rule (a multi-label prediction): one map each."""
    pixels = torch.from_numpy(picture).permute(2, 0, 1).double() / 255
    seen: list[np.ndarray] = []

    def every_label(logits: np.ndarray) -> list[int]:
        seen.append(logits)
        return list(range(len(logits)))

    explanation = attribute(model, (pixels - MEAN) / STD, "xrai", {"n_steps": 4}, targets=every_label, image=picture, **IMAGENET)
    assert len(seen) == 1 and seen[0].shape == (3,)
    assert explanation.targets == [0, 1, 2] and explanation.attributions.shape == (3, 3, 64, 64)
    assert not torch.equal(explanation.attributions[0], explanation.attributions[1])
