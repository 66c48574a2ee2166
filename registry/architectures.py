"""Model architectures Lantern can rebuild from a spec, and each one's default Grad-CAM layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A four-block CNN that trains in seconds on the CPU on small images."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.features = nn.Sequential(
            _conv_block(3, widths[0], pool=True),
            _conv_block(widths[0], widths[1], pool=True),
            _conv_block(widths[1], widths[2], pool=True),
            _conv_block(widths[2], widths[3], pool=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@dataclass(frozen=True)
class Architecture:
    """How to build one architecture, and which layer Grad-CAM uses when the spec does not say."""

    build: Callable[[int], nn.Module]
    gradcam_layer: str | None  # None: the last Conv2d module


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    return lambda num_classes: torchvision.models.get_model(name, weights=None, num_classes=num_classes)


ARCHITECTURES: dict[str, Architecture] = {
    "small_cnn": Architecture(SmallCNN, "features.3"),
    "resnet18": Architecture(_torchvision("resnet18"), "layer4.1"),
    "resnet34": Architecture(_torchvision("resnet34"), "layer4.2"),
    "resnet50": Architecture(_torchvision("resnet50"), "layer4.2"),
    "mobilenet_v3_small": Architecture(_torchvision("mobilenet_v3_small"), "features.12"),
    "mobilenet_v3_large": Architecture(_torchvision("mobilenet_v3_large"), "features.16"),
    "efficientnet_b0": Architecture(_torchvision("efficientnet_b0"), "features.8"),
}


def last_conv_layer(model: nn.Module) -> str:
    """Name of the last nn.Conv2d module in registration order."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("the model has no Conv2d layer; name a Grad-CAM layer explicitly")
    return names[-1]


def default_gradcam_layer(arch: str, num_classes: int) -> str:
    """The layer Grad-CAM hooks by default: the last convolutional stage (the model is built only if not known)."""
    return ARCHITECTURES[arch].gradcam_layer or last_conv_layer(ARCHITECTURES[arch].build(num_classes))
