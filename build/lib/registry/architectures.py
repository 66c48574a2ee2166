"""Model architectures Lantern can rebuild from a spec, and each one's default Grad-CAM layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a model is built: commands that only read the registry start faster
    from torch import nn


@dataclass(frozen=True)
class Architecture:
    """How to build one architecture, and which layer Grad-CAM uses when the spec does not say."""

    build: Callable[[int], nn.Module]
    gradcam_layer: str | None  # None: the last Conv2d module
    head: str  # the final classifier layer (replaced when fine-tuning onto new labels)


def _small_cnn(num_classes: int) -> nn.Module:
    from registry.small_cnn import SmallCNN

    return SmallCNN(num_classes)


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision  # imported when a model is built: it takes seconds, and `lantern --help` needs none

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build


ARCHITECTURES: dict[str, Architecture] = {
    "small_cnn": Architecture(_small_cnn, "features.3", "classifier"),
    "resnet18": Architecture(_torchvision("resnet18"), "layer4.1", "fc"),
    "resnet34": Architecture(_torchvision("resnet34"), "layer4.2", "fc"),
    "resnet50": Architecture(_torchvision("resnet50"), "layer4.2", "fc"),
    "mobilenet_v3_small": Architecture(_torchvision("mobilenet_v3_small"), "features.12", "classifier.3"),
    "mobilenet_v3_large": Architecture(_torchvision("mobilenet_v3_large"), "features.16", "classifier.3"),
    "efficientnet_b0": Architecture(_torchvision("efficientnet_b0"), "features.8", "classifier.1"),
}


def last_conv_layer(model: nn.Module) -> str:
    """Name of the last nn.Conv2d module in registration order."""
    from torch import nn

    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("the model has no Conv2d layer; name a Grad-CAM layer explicitly")
    return names[-1]


def default_gradcam_layer(arch: str, num_classes: int) -> str:
    """The layer Grad-CAM hooks by default: the last convolutional stage (the model is built only if not known)."""
    return ARCHITECTURES[arch].gradcam_layer or last_conv_layer(ARCHITECTURES[arch].build(num_classes))
