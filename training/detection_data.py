"""Detection examples as torchvision's detectors take them: an image tensor and a target of boxes in pixels, class
numbers (label `k` of the version is class `k + 1`; 0 is the background) and, for instance segmentation, one mask per
object rasterised from its polygons. Crowds are left out of training targets (torchvision's detectors have no
notion of them) and kept apart for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from skimage.draw import polygon2mask
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from registry.errors import LanternError
from registry.images import ImageDecodeError, as_rgb, upright
from training.detection_index import DetectionExample, LabelledObject


@dataclass(frozen=True)
class DetectionTarget:
    """One image's objects in pixels: what a detector trains on (`train`) and the crowds kept for evaluation."""

    train: dict[str, torch.Tensor]
    crowd_boxes: torch.Tensor
    crowd_labels: torch.Tensor


def objects_mask(objects: tuple[LabelledObject, ...], width: int, height: int) -> torch.Tensor:
    """One mask per object [N, H, W] (uint8): the pixels whose centres lie inside its polygons."""
    masks = np.zeros((len(objects), height, width), bool)
    for number, obj in enumerate(objects):
        for ring in obj.polygons:
            rows_cols = np.stack([np.asarray(ring[1::2]) * height - 0.5, np.asarray(ring[0::2]) * width - 0.5], 1)
            masks[number] |= polygon2mask((height, width), rows_cols)
    return torch.from_numpy(masks.astype(np.uint8))


def detection_target(example: DetectionExample, labels: list[str], width: int, height: int,
                     masks: bool) -> DetectionTarget:
    """The target of `example` for an image of `width` x `height` pixels."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    plain = tuple(obj for obj in example.objects if not obj.is_crowd)
    crowds = [obj for obj in example.objects if obj.is_crowd]
    unknown = sorted({obj.label for obj in example.objects} - set(labels))
    if unknown:
        raise LanternError(f"{example.path}: label(s) {', '.join(unknown)} not among {', '.join(labels)}")
    classes = [labels.index(obj.label) + 1 for obj in plain]
    boxes = torch.tensor([obj.box for obj in plain], dtype=torch.float32).reshape(-1, 4) * scale
    train = {"boxes": boxes, "labels": torch.tensor(classes, dtype=torch.int64)}
    if masks:
        train["masks"] = objects_mask(plain, width, height)
    crowd_boxes = torch.tensor([obj.box for obj in crowds], dtype=torch.float32).reshape(-1, 4) * scale
    crowd_labels = torch.tensor([labels.index(obj.label) + 1 for obj in crowds], dtype=torch.int64)
    return DetectionTarget(train, crowd_boxes, crowd_labels)


class DetectionDataset(Dataset):
    """The examples' images (uint8 [3, H, W], upright RGB) with their targets."""

    def __init__(self, examples: list[DetectionExample], labels: list[str], masks: bool) -> None:
        self.examples = examples
        self.labels = labels
        self.masks = masks

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, DetectionTarget]:
        example = self.examples[index]
        try:
            with Image.open(example.path) as opened:
                image = as_rgb(upright(opened))
        except (OSError, ImageDecodeError) as error:
            raise LanternError(f"cannot read {example.path}: {error}") from None
        width, height = image.size
        if example.width is not None and (example.width, example.height) != (width, height):
            raise LanternError(f"{example.path} is {width} x {height} px, but its index line says "
                               f"{example.width} x {example.height}")
        return pil_to_tensor(image), detection_target(example, self.labels, width, height, self.masks)


def collate(batch: list[tuple[torch.Tensor, DetectionTarget]]) -> tuple[list[torch.Tensor], list[DetectionTarget]]:
    """Images of different sizes stay a list: the detector resizes and batches them itself."""
    return [image for image, _ in batch], [target for _, target in batch]
