"""Detection and instance-segmentation architectures Lantern can rebuild from a spec: torchvision's detectors (built
without downloaded weights) and two small ones that train on the shapes data in minutes on a CPU. Class `k` of a
version's labels is the detector's class `k + 1` (0 is the background, as torchvision counts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and torchvision are imported when a model is built
    from torch import nn

    from registry.settings import DetectionSettings

SMALL_ANCHOR_SIZES = (8, 16, 32, 64)  # pixels: the shapes data's objects are 8-40 px across at 128 px
SMALL_BOX_FEATURES = 256
SMALL_MASK_CHANNELS = 64
SMALL_MIN_SIZE = 128  # the shapes data's default image size
SMALL_SAMPLING_RATIO = 1  # RoIAlign's samples per bin side: its backward pass is most of a CPU training step


@dataclass(frozen=True)
class DetectorArchitecture:
    """How to build one detector for `num_classes` labels (background excluded), and which tasks it serves."""

    build: Callable[[int], nn.Module]
    tasks: tuple[str, ...]
    min_size: int = 800  # the shorter side it was designed for (torchvision's default): a session's default


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes + 1)

    return build


def _small_backbone(width: int = 32) -> nn.Module:
    """Six 3 x 3 convolutions, stride 8 in all: one feature map of `4 * width` channels."""
    from torch import nn

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    body = nn.Sequential(block(3, width, 2), block(width, width, 1), block(width, 2 * width, 2),
                         block(2 * width, 2 * width, 1), block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1))
    body.out_channels = 4 * width  # what torchvision's detectors read from a backbone
    return body


def _small(masks: bool) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision.models.detection import FasterRCNN, MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.ops import MultiScaleRoIAlign

        backbone = _small_backbone()
        parts = {"rpn_anchor_generator": AnchorGenerator((SMALL_ANCHOR_SIZES,), ((0.5, 1.0, 2.0),)),
                 "box_roi_pool": MultiScaleRoIAlign(["0"], 7, SMALL_SAMPLING_RATIO), "min_size": SMALL_MIN_SIZE,
                 "max_size": 2 * SMALL_MIN_SIZE,
                 # a box head of 256 features (torchvision's has 1024): half the training step on the CPU
                 "box_head": TwoMLPHead(backbone.out_channels * 7 * 7, SMALL_BOX_FEATURES),
                 "box_predictor": FastRCNNPredictor(SMALL_BOX_FEATURES, num_classes + 1),
                 "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
                 "rpn_post_nms_top_n_test": 100, "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 64}
        if masks:  # a mask head of two 64-channel convolutions (torchvision's: four of 256)
            return MaskRCNN(backbone, None, mask_roi_pool=MultiScaleRoIAlign(["0"], 14, SMALL_SAMPLING_RATIO),
                            mask_head=MaskRCNNHeads(backbone.out_channels, (SMALL_MASK_CHANNELS,) * 2, 1),
                            mask_predictor=MaskRCNNPredictor(SMALL_MASK_CHANNELS, SMALL_MASK_CHANNELS,
                                                             num_classes + 1), **parts)
        return FasterRCNN(backbone, None, **parts)

    return build


BOXES = ("object_detection",)
BOXES_AND_MASKS = ("object_detection", "instance_segmentation")
DETECTORS: dict[str, DetectorArchitecture] = {
    "small_detector": DetectorArchitecture(_small(masks=False), BOXES, SMALL_MIN_SIZE),
    "small_segmenter": DetectorArchitecture(_small(masks=True), BOXES_AND_MASKS, SMALL_MIN_SIZE),
    "fasterrcnn_resnet50_fpn": DetectorArchitecture(_torchvision("fasterrcnn_resnet50_fpn"), BOXES),
    "fasterrcnn_resnet50_fpn_v2": DetectorArchitecture(_torchvision("fasterrcnn_resnet50_fpn_v2"), BOXES),
    "fasterrcnn_mobilenet_v3_large_fpn": DetectorArchitecture(_torchvision("fasterrcnn_mobilenet_v3_large_fpn"),
                                                              BOXES),
    "retinanet_resnet50_fpn": DetectorArchitecture(_torchvision("retinanet_resnet50_fpn"), BOXES),
    "maskrcnn_resnet50_fpn": DetectorArchitecture(_torchvision("maskrcnn_resnet50_fpn"), BOXES_AND_MASKS),
}


def apply_detection_settings(model: nn.Module, settings: DetectionSettings) -> nn.Module:
    """Set the settings that act inside the detector: the resize bounds, the score threshold, NMS and the most
    detections per image (tiling and the answers' form act outside it)."""
    model.transform.min_size = (settings.min_size,)
    model.transform.max_size = settings.max_size
    heads = getattr(model, "roi_heads", None)
    if heads is not None:  # two-stage detectors
        heads.score_thresh = settings.box_score_thresh
        heads.nms_thresh = settings.nms_iou_thresh
        heads.detections_per_img = settings.box_detections_per_img
    else:  # RetinaNet
        model.score_thresh = settings.box_score_thresh
        model.nms_thresh = settings.nms_iou_thresh
        model.detections_per_img = settings.box_detections_per_img
    return model
