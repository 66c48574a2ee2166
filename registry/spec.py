"""The model spec: what is needed to rebuild a registered model's nn.Module and feed it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.architectures import ARCHITECTURES, default_gradcam_layer
from registry.detectors import DETECTORS
from registry.errors import SpecError, describe_validation_error
from registry.settings import Task, is_detection

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the normalisation of torchvision's ImageNet weights, as `explain.attribute(..., **IMAGENET)` takes it
IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _known_arch(arch: str) -> str:
    if arch not in ARCHITECTURES and arch not in DETECTORS:
        raise ValueError(f"unknown architecture {arch!r}; accepted: classifiers {', '.join(sorted(ARCHITECTURES))}; "
                         f"detectors {', '.join(sorted(DETECTORS))}")
    return arch


ArchName = Annotated[str, AfterValidator(_known_arch)]
"""An architecture name Lantern can rebuild (a key of ARCHITECTURES or of DETECTORS)."""


def arch_task_problem(arch: str, task: str) -> str | None:
    """Why `arch` cannot learn `task` (None if it can): classifiers classify, detectors detect (and only the mask
    detectors segment)."""
    if is_detection(task):
        if arch not in DETECTORS:
            return (f"{arch} is a classifier; {task} needs a detector: "
                    + ", ".join(name for name, d in DETECTORS.items() if task in d.tasks))
        if task not in DETECTORS[arch].tasks:
            return (f"{arch} does not predict masks; instance_segmentation needs one of "
                    + ", ".join(name for name, d in DETECTORS.items() if task in d.tasks))
    elif arch not in ARCHITECTURES:
        return f"{arch} is a detector; {task} needs a classifier: {', '.join(ARCHITECTURES)}"
    return None


class ModelSpec(BaseModel):
    """Architecture, number of classes, task, Grad-CAM layer (classifiers only) and input normalisation of a model
    version. A detector normalises inside itself (its `transform`), with `normalize_mean`/`normalize_std`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: ArchName
    num_classes: int = Field(ge=1)
    task: Task
    gradcam_layer: str | None = None
    normalize_mean: tuple[float, float, float] = IMAGENET_MEAN
    normalize_std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("normalize_std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("normalize_std values must be positive")
        return std

    @model_validator(mode="after")
    def _arch_fits_task(self) -> "ModelSpec":
        problem = arch_task_problem(self.arch, self.task)
        if problem:
            raise ValueError(problem)
        if is_detection(self.task) and self.gradcam_layer is not None:
            raise ValueError("a detector has no Grad-CAM layer: explanations are for classification models")
        if not is_detection(self.task) and self.gradcam_layer is None:
            raise ValueError("a classifier's spec names its Grad-CAM layer")
        return self


def build_module(spec: ModelSpec) -> nn.Module:
    """A freshly initialised nn.Module for `spec`, in eval mode; a classifier's Grad-CAM layer is checked to exist.
    A detector normalises with the spec's mean and std."""
    if is_detection(spec.task):
        model = DETECTORS[spec.arch].build(spec.num_classes)
        model.transform.image_mean, model.transform.image_std = list(spec.normalize_mean), list(spec.normalize_std)
        return model.eval()
    model = ARCHITECTURES[spec.arch].build(spec.num_classes)
    if spec.gradcam_layer not in dict(model.named_modules()):
        raise SpecError(f"Grad-CAM layer {spec.gradcam_layer!r} is not a module of {spec.arch}")
    return model.eval()


def make_spec(arch: str, num_classes: int, task: str, gradcam_layer: str | None = None,
              normalize_mean: tuple[float, float, float] | None = None,
              normalize_std: tuple[float, float, float] | None = None) -> ModelSpec:
    """Validate the parts of a spec; a classifier's Grad-CAM layer defaults to the architecture's last conv stage."""
    detector = is_detection(task)
    values: dict = {"arch": arch, "num_classes": num_classes, "task": task,
                    "gradcam_layer": gradcam_layer if detector else gradcam_layer or "?"}
    if normalize_mean is not None:
        values["normalize_mean"] = normalize_mean
    if normalize_std is not None:
        values["normalize_std"] = normalize_std
    try:
        spec = ModelSpec.model_validate(values)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, "model spec")) from None
    if gradcam_layer is None and not detector:
        spec = spec.model_copy(update={"gradcam_layer": default_gradcam_layer(arch, num_classes)})
    return spec
