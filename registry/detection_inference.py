"""Running a detector on one image as a version's settings say: the detector itself (torch, or its ONNX export)
resizes, thresholds and suppresses; with tile_grid_size the image is also cut into overlapping tiles, each run at
the detector's size (small objects grow), and the tiles' detections are merged with the whole image's by NMS at
tile_predictions_nms_thresh, keeping the best box_detections_per_img."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.ops import batched_nms
from torchvision.transforms.functional import pil_to_tensor

from registry.detection_answers import DetectionAnswer, RawDetections, detection_answer
from registry.settings import DetectionSettings

Detector = Callable[[torch.Tensor], RawDetections]
"""Runs on one image (float [3, H, W] in [0, 1]) and answers in its pixels."""


def raw_detections(output: dict[str, torch.Tensor]) -> RawDetections:
    """A torchvision detector's answer for one image as arrays."""
    masks = output.get("masks")
    return RawDetections(output["boxes"].detach().float().cpu().numpy(),
                         output["scores"].detach().float().cpu().numpy(), output["labels"].detach().cpu().numpy(),
                         None if masks is None else masks.detach().float().cpu().numpy()[:, 0])


def torch_detections(model: nn.Module, images: list[torch.Tensor],
                     device: torch.device | str = "cpu") -> list[RawDetections]:
    """`model`'s answers for a list of images (float [3, H, W] in [0, 1]) in one call: the detector resizes and pads
    them into one batch itself."""
    with torch.inference_mode():
        return [raw_detections(output) for output in model([image.to(device) for image in images])]


def torch_detector(model: nn.Module, device: torch.device | str = "cpu") -> Detector:
    """`model` (eval mode, settings applied) as a Detector."""
    model = model.eval().to(device)
    return lambda image: torch_detections(model, [image], device)[0]


def tiles(width: int, height: int, grid: tuple[int, int], overlap: float) -> list[tuple[int, int, int, int]]:
    """The (x0, y0, x1, y1) of a `grid` (columns, rows) of tiles covering the image, neighbours sharing `overlap`
    of a tile's side."""

    def spans(size: int, count: int) -> list[tuple[int, int]]:
        side = size / (count - (count - 1) * overlap)
        step = side * (1 - overlap)
        return [(math.floor(i * step), min(size, math.ceil(i * step + side))) for i in range(count)]

    return [(x0, y0, x1, y1) for y0, y1 in spans(height, grid[1]) for x0, x1 in spans(width, grid[0])]


def _kept_masks(parts: list[tuple[RawDetections, int, int]], keep: np.ndarray, width: int,
                height: int) -> np.ndarray:
    """The masks of the kept detections (indices into the parts' concatenation), pasted onto the whole image."""
    owners = np.concatenate([np.full(len(found.scores), number) for number, (found, _, _) in enumerate(parts)])
    rows = np.concatenate([np.arange(len(found.scores)) for found, _, _ in parts])
    masks = np.zeros((len(keep), height, width), dtype=np.float32)
    for out, index in enumerate(keep):
        found, x0, y0 = parts[owners[index]]
        tile = found.masks[rows[index]]
        masks[out, y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] = tile
    return masks


def tile_inputs(image: torch.Tensor, settings: DetectionSettings) -> list[tuple[torch.Tensor, int, int]]:
    """What the detector runs on for `image`: the whole image, then (with tile_grid_size) each tile, with the
    position (x0, y0) of its top-left corner."""
    parts = [(image, 0, 0)]
    if settings.tile_grid_size is not None:
        height, width = image.shape[-2:]
        parts += [(image[:, y0:y1, x0:x1], x0, y0)
                  for x0, y0, x1, y1 in tiles(width, height, settings.tile_grid_size, settings.tile_overlap_ratio)]
    return parts


def merge_parts(parts: list[tuple[RawDetections, int, int]], settings: DetectionSettings, width: int,
                height: int) -> RawDetections:
    """The detections of the whole image and of its tiles (at their positions) as one answer: NMS at
    tile_predictions_nms_thresh, at most box_detections_per_img. One part (no tiling) is returned as it is."""
    if len(parts) == 1:
        return parts[0][0]
    boxes = np.concatenate([found.boxes + np.array([x0, y0, x0, y0], dtype=np.float32) for found, x0, y0 in parts])
    scores = np.concatenate([found.scores for found, _, _ in parts])
    classes = np.concatenate([found.classes for found, _, _ in parts])
    keep = batched_nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), torch.from_numpy(classes),
                       settings.tile_predictions_nms_thresh)[:settings.box_detections_per_img].numpy()
    masks = None if parts[0][0].masks is None else _kept_masks(parts, keep, width, height)
    return RawDetections(boxes[keep], scores[keep], classes[keep], masks)


def detect(image: torch.Tensor, detector: Detector, settings: DetectionSettings) -> RawDetections:
    """The detections of `image` (float [3, H, W] in [0, 1]), tiled when the settings ask for it."""
    parts = [(detector(part), x0, y0) for part, x0, y0 in tile_inputs(image, settings)]
    return merge_parts(parts, settings, image.shape[-1], image.shape[-2])


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A decoded RGB image as a detector takes it: float [3, H, W] in [0, 1]."""
    return pil_to_tensor(image).float().div_(255.0)


def decode_side(settings: DetectionSettings) -> int | None:
    """The shorter side a JPEG may be decoded down to (registry/images.decode_image): the detector's own size, or
    the full image when it is tiled (each tile is enlarged to that size)."""
    return None if settings.tile_grid_size is not None else settings.min_size


def answer_image(image: Image.Image, detector: Detector, labels: list[str],
                 settings: DetectionSettings) -> DetectionAnswer:
    """The cloud's answer for one decoded image."""
    found = detect(image_tensor(image), detector, settings)
    return detection_answer(found, labels, image.width, image.height, settings)
