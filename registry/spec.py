"""The model spec: what is needed to rebuild a registered model's nn.Module and feed it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry.architectures import ARCHITECTURES, default_gradcam_layer
from registry.errors import SpecError, describe_validation_error
from registry.settings import Task

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the normalisation of torchvision's ImageNet weights, as `explain.attribute(..., **IMAGENET)` takes it
IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _known_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(sorted(ARCHITECTURES))}")
    return arch


ArchName = Annotated[str, AfterValidator(_known_arch)]
"""An architecture name Lantern can rebuild (a key of ARCHITECTURES)."""


class ModelSpec(BaseModel):
    """Architecture, head size, task, Grad-CAM layer and input normalisation of a model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: ArchName
    num_classes: int = Field(ge=1)
    task: Task
    gradcam_layer: str
    normalize_mean: tuple[float, float, float] = IMAGENET_MEAN
    normalize_std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("normalize_std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("normalize_std values must be positive")
        return std


def build_module(spec: ModelSpec) -> nn.Module:
    """A freshly initialised nn.Module for `spec`, in eval mode; its Grad-CAM layer is checked to exist."""
    model = ARCHITECTURES[spec.arch].build(spec.num_classes)
    if spec.gradcam_layer not in dict(model.named_modules()):
        raise SpecError(f"Grad-CAM layer {spec.gradcam_layer!r} is not a module of {spec.arch}")
    return model.eval()


def make_spec(arch: str, num_classes: int, task: str, gradcam_layer: str | None = None,
              normalize_mean: tuple[float, float, float] | None = None,
              normalize_std: tuple[float, float, float] | None = None) -> ModelSpec:
    """Validate the parts of a spec; the Grad-CAM layer defaults to the architecture's last conv stage."""
    values: dict = {"arch": arch, "num_classes": num_classes, "task": task, "gradcam_layer": gradcam_layer or "?"}
    if normalize_mean is not None:
        values["normalize_mean"] = normalize_mean
    if normalize_std is not None:
        values["normalize_std"] = normalize_std
    try:
        spec = ModelSpec.model_validate(values)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, "model spec")) from None
    if gradcam_layer is None:
        spec = spec.model_copy(update={"gradcam_layer": default_gradcam_layer(arch, num_classes)})
    return spec
