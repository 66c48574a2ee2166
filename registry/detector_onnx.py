"""A detector's ONNX export (one image a run, any height and width; the version's settings are part of the graph:
resize bounds, score threshold, NMS, detections per image), running it as a Detector, and the parity check that
compares its detections with torch's after matching them."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from registry.detection_answers import RawDetections
from registry.detection_inference import Detector, torch_detector
from registry.onnx_export import OPSET, make_session
from registry.settings import DetectionSettings

IMAGE_INPUT = "image"
BOX_OUTPUTS = ("boxes", "labels", "scores")
MASK_OUTPUT = "masks"
MATCH_IOU = 0.5  # a torch detection and an ONNX one of the same class overlapping this much are the same object
EXPORTING = threading.Lock()  # torch's exporter keeps global state: one export at a time in a process


def graph_settings(settings: DetectionSettings) -> tuple:
    """The settings a detector's ONNX export holds in its graph (others act outside it: tiling, the answers' form):
    another value of any of them needs another export."""
    return (settings.min_size, settings.max_size, settings.box_score_thresh, settings.nms_iou_thresh,
            settings.box_detections_per_img)


def output_order(model: nn.Module, image_size: int) -> list[str]:
    """The names of a detector's answers in the order the exporter flattens them: its answer's own (Faster and Mask
    R-CNN answer boxes, labels, scores[, masks]; RetinaNet boxes, scores, labels), so each ONNX output is named for
    what it holds."""
    with torch.no_grad():
        answer = model([torch.rand(3, image_size, image_size)])[0]
    names = list(answer)
    known = {*BOX_OUTPUTS, MASK_OUTPUT}
    if not set(BOX_OUTPUTS) <= set(names) <= known:
        raise ValueError(f"the detector answers {names}; Lantern reads {sorted(known)}")
    return names


def export_detector_onnx(model: nn.Module, image_size: int, path: str | Path) -> Path:
    """Export `model` (eval mode, CPU, settings applied) to ONNX at `path` with TorchScript's exporter, as
    torchvision tests its detectors' export."""
    model = model.eval().cpu()
    outputs = output_order(model, image_size)
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with EXPORTING, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([torch.rand(3, image_size, image_size)],), str(path), dynamo=False,
                          opset_version=OPSET, input_names=[IMAGE_INPUT], output_names=outputs,
                          dynamic_axes={IMAGE_INPUT: {1: "height", 2: "width"},
                                        **{name: {0: "detections"} for name in outputs}})
    return Path(path)


def onnx_detector(path: str | Path, device: str = "cpu", threads: int | None = None) -> Detector:
    """The exported detector at `path` as a Detector."""
    session = make_session(path, device=device, threads=threads)
    names = [output.name for output in session.get_outputs()]

    def run(image: torch.Tensor) -> RawDetections:
        found = dict(zip(names, session.run(None, {IMAGE_INPUT: image.detach().cpu().float().numpy()})))
        masks = found.get(MASK_OUTPUT)
        return RawDetections(found["boxes"], found["scores"], found["labels"], None if masks is None else masks[:, 0])

    return run


def parity_images(settings: DetectionSettings, seed: int = 0) -> list[torch.Tensor]:
    """Three images for the parity check, of different sizes and shapes: smooth noise with filled rectangles and
    discs on it, so that a trained detector finds something."""
    generator = torch.Generator().manual_seed(seed)
    side = settings.min_size
    images = []
    for height, width in ((side, side), (side, math.ceil(side * 1.5)), (math.ceil(side * 1.25), side)):
        coarse = torch.rand(3, 8, 8, generator=generator)
        image = nn.functional.interpolate(coarse[None], size=(height, width), mode="bilinear")[0]
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        for _ in range(4):
            cx, cy = (torch.rand(2, generator=generator) * torch.tensor([width, height])).tolist()
            radius = float(torch.empty(1).uniform_(0.05, 0.2, generator=generator)) * side
            colour = torch.rand(3, 1, generator=generator)
            inside = ((xs - cx) ** 2 + (ys - cy) ** 2 < radius ** 2) if torch.rand(1, generator=generator) < 0.5 \
                else ((xs - cx).abs() < radius) & ((ys - cy).abs() < radius)
            image[:, inside] = colour
        images.append(image.clamp(0, 1))
    return images


def detections_difference(expected: RawDetections, actual: RawDetections, width: int, height: int,
                          score_thresh: float) -> float:
    """The largest difference between two answers for one image, after matching each expected detection with the
    most overlapping actual one of its class: of box corners (as a share of the image's side), of scores and of
    mask pixel scores. A detection without a match counts its score (less what it needed to be kept), so a missing
    or extra detection is a difference unless it was at the threshold's edge."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    a_boxes, b_boxes = torch.as_tensor(expected.boxes).double(), torch.as_tensor(actual.boxes).double()
    largest = 0.0
    unmatched = set(range(len(b_boxes)))
    overlaps = box_iou(a_boxes, b_boxes) if len(a_boxes) and len(b_boxes) else torch.zeros(len(a_boxes), 0)
    for index in np.argsort(-expected.scores, kind="stable"):
        candidates = [j for j in unmatched if actual.classes[j] == expected.classes[index]
                      and overlaps[index, j] >= MATCH_IOU]
        if not candidates:
            largest = max(largest, float(expected.scores[index]) - score_thresh)
            continue
        match = max(candidates, key=lambda j: float(overlaps[index, j]))
        unmatched.discard(match)
        largest = max(largest, float(((a_boxes[index] - b_boxes[match]).abs() / scale).max()),
                      abs(float(expected.scores[index]) - float(actual.scores[match])))
        if expected.masks is not None and actual.masks is not None:
            largest = max(largest, float(np.abs(expected.masks[index] - actual.masks[match]).max()))
    for j in unmatched:
        largest = max(largest, float(actual.scores[j]) - score_thresh)
    return largest


def detector_parity(model: nn.Module, onnx_path: str | Path, settings: DetectionSettings) -> float:
    """The largest difference between torch's and ONNX Runtime's detections on the parity images (CPU)."""
    expected, actual = torch_detector(model, "cpu"), onnx_detector(onnx_path, "cpu")
    return max(detections_difference(expected(image), actual(image), image.shape[2], image.shape[1],
                                     settings.box_score_thresh) for image in parity_images(settings))
