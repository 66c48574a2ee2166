"""The training image pipeline's sizes: the classification defaults (resize 256, center-crop 224) scaled to the
training image size, and the fixed-size images the batch augmentation starts from."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from registry.spec import ModelSpec
from training.augment import BatchAugment


def valid_sizes(image_size: int) -> tuple[int, int]:
    """The classification defaults (resize 256, crop 224) scaled to `image_size`: (resize, crop)."""
    return round(image_size * 256 / 224), image_size


def valid_settings(image_size: int) -> dict[str, int]:
    """The settings overrides a model trained at `image_size` is registered with."""
    resize, crop = valid_sizes(image_size)
    return {"valid_resize_size": resize, "valid_crop_size": crop}


def detector_settings(image_size: int) -> dict[str, int]:
    """The settings overrides a detector trained at `image_size` (its shorter side) is registered with: the longer
    side capped at torchvision's ratio (800 and 1333)."""
    return {"min_size": image_size, "max_size": round(image_size * 1333 / 800)}


class TrainImage:
    """Per image, before batching: resize the shorter side to the validation resize size and center-crop a square
    of that size (uint8), so every image of a batch has one size and the random crops cover what validation sees."""

    def __init__(self, image_size: int) -> None:
        self.size = valid_sizes(image_size)[0]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        resized = F.resize(image, [self.size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return F.center_crop(resized, [self.size, self.size])


def batch_augment(image_size: int, spec: ModelSpec, augment: bool = True) -> BatchAugment:
    """Random resized crop (60-100 % of the area) + flip + colour jitter 0.2, or a plain resize when not `augment`."""
    return BatchAugment(image_size, spec.normalize_mean, spec.normalize_std, enabled=augment)
