"""Preprocessing (registry/preprocess.py): resize the shorter side, center-crop, normalise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from registry.preprocess import Preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def torchvision_crop(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """The reference: torchvision's Resize(shorter side) then CenterCrop on the whole image."""
    resized = F.resize(image, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(F.center_crop(resized, [crop, crop])).astype(int)


@pytest.mark.parametrize("size", [(256, 256), (224, 224), (300, 200), (200, 300), (640, 480), (257, 256), (1000, 37),
                                  (31, 900), (16, 16), (4032, 3024), (29, 223)])
@pytest.mark.parametrize("resize, crop", [(256, 224), (72, 64), (224, 224)])
def test_crop_matches_torchvision_resize_then_center_crop(size: tuple[int, int], resize: int, crop: int) -> None:
    """Only the kept square is resampled, on the same grid with the same filter: within one grey level of resizing
    the whole image with torchvision and cropping it (Pillow rounds to 8 bits between its horizontal and vertical
    passes, and may take them in the other order for the smaller region)."""
    image = noise(*size)
    ours = np.asarray(Preprocess(resize, crop, MEAN, STD).crop(image)).astype(int)
    reference = torchvision_crop(image, resize, crop)
    assert ours.shape == reference.shape == (crop, crop, 3)
    assert np.abs(ours - reference).max() <= 1
    assert np.abs(ours - reference).mean() < 0.3


@pytest.mark.parametrize("size", [(10_000_000, 1), (1, 10_000_000), (30_000, 2)])
def test_extreme_aspect_ratios_cost_no_more_than_the_crop(size: tuple[int, int]) -> None:
    """A 10 million x 1 image (a PNG of a few KB, under the pixel limit) resized whole to a 256 px shorter side would be
    2.56e9 x 256 pixels; only the kept square is computed."""
    image = Image.new("RGB", size, (255, 128, 0))
    x = Preprocess(256, 224, MEAN, STD)(image)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-5)


def test_tensors_take_torchvision_path() -> None:
    """[3, H, W] uint8 tensors (training data) are resized and cropped by torchvision and stay tensors."""
    pixels = torch.from_numpy(np.asarray(noise(90, 60))).permute(2, 0, 1).contiguous()
    cropped = Preprocess(40, 32, MEAN, STD).crop(pixels)
    assert isinstance(cropped, torch.Tensor) and cropped.shape == (3, 32, 32)
    reference = F.center_crop(F.resize(pixels, [40], antialias=True), [32, 32])
    assert torch.equal(cropped, reference)


@pytest.mark.parametrize("mean, std", [(MEAN, STD), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                       ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))])
def test_rgb_images_normalise_bit_for_bit_as_torchvision(mean: tuple, std: tuple) -> None:
    """RGB images are normalised with numpy (no torch intra-op threads on the server's decode pool), equal bit for
    bit to torchvision's to_dtype + normalize (which tensors and other image modes still use); every grey level is
    covered in every channel."""
    preprocess = Preprocess(64, 64, mean, std)
    levels = np.arange(256, dtype=np.uint8)
    grid = np.stack([np.tile(levels, (64, 1)), np.tile(levels[::-1], (64, 1)), np.tile(levels * 7, (64, 1))], axis=-1)
    for image in (Image.fromarray(np.ascontiguousarray(grid[:, :64])), Image.fromarray(np.ascontiguousarray(grid)),
                  noise(64, 64, seed=3)):
        ours = preprocess.normalize(image)
        reference = F.normalize(F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), list(mean), list(std))
        assert ours.dtype == torch.float32 and ours.is_contiguous() and ours.shape == reference.shape
        assert torch.equal(ours, reference)
