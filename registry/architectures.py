"""Model architectures Lantern can rebuild from a spec, and each one's default Grad-CAM layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


def _conv_block(c_in: int, c_out: int, pool: bool, stride: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                               nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A four-block CNN that trains in seconds on the CPU on small images.

    The first convolution has stride 2 and the first three blocks max-pool, so a 64 px image becomes 4 x 4 features
    (an eighth of the first block's full-resolution cost, which dominated the training step on the CPU)."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        self.features = nn.Sequential(
            _conv_block(3, widths[0], pool=True, stride=2),
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
    head: str  # the final classifier layer (replaced when fine-tuning onto new labels)


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision  # imported when a model is built: it takes seconds, and `lantern --help` needs none

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build


ARCHITECTURES: dict[str, Architecture] = {
    "small_cnn": Architecture(SmallCNN, "features.3", "classifier"),
    "resnet18": Architecture(_torchvision("resnet18"), "layer4.1", "fc"),
    "resnet34": Architecture(_torchvision("resnet34"), "layer4.2", "fc"),
    "resnet50": Architecture(_torchvision("resnet50"), "layer4.2", "fc"),
    "mobilenet_v3_small": Architecture(_torchvision("mobilenet_v3_small"), "features.12", "classifier.3"),
    "mobilenet_v3_large": Architecture(_torchvision("mobilenet_v3_large"), "features.16", "classifier.3"),
    "efficientnet_b0": Architecture(_torchvision("efficientnet_b0"), "features.8", "classifier.1"),
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
