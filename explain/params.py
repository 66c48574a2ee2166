"""The explanation methods and their parameters (SPEC.md section 4), validated with readable errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Method = Literal["xrai", "integrated_gradients", "guided_gradcam", "guided_backprop"]
METHODS: tuple[str, ...] = get_args(Method)  # the one list of methods: the API's enum, the CLI's choices, PARAMS' keys
GUIDED_METHODS = ("guided_backprop", "guided_gradcam")  # those that hook the module they run on
ApproximationMethod = Literal["riemann_middle", "gausslegendre"]


class ExplainError(ValueError):
    """Bad method name or parameters; the message names what was wrong and what is accepted."""


class SmoothGrad(BaseModel):
    """Optional SmoothGrad: average the attributions of noisy copies (the cloud reference uses 5 samples, sigma 0.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    smoothgrad_samples: int = Field(0, ge=0, le=64, description="noisy samples; 0 turns SmoothGrad off")
    smoothgrad_stdev: float = Field(0.2, gt=0, le=5, description="noise sigma in the normalised input space")


class IntegratedGradientsParams(SmoothGrad):
    n_steps: int = Field(50, ge=2, le=1024, description="points on the path from the baseline to the input")
    approximation_method: ApproximationMethod = "riemann_middle"
    internal_batch_size: int | None = Field(None, ge=1, description="path points per forward/backward pass "
                                                                    "(default: sized to fit memory)")


class XRAIParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    n_steps: int = Field(50, ge=2, le=1024, description="integrated-gradients steps per baseline (black and white)")
    xrai_fast: bool = Field(True, description="rank the segments once (faster, less exact) instead of the full "
                                              "greedy search")
    internal_batch_size: int | None = Field(None, ge=1, description="path points per forward/backward pass")


class GuidedParams(BaseModel):
    """Guided backprop and guided Grad-CAM take no parameters besides optional SmoothGrad."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    smoothgrad_samples: int = Field(0, ge=0, le=64)
    smoothgrad_stdev: float = Field(0.2, gt=0, le=5)


PARAMS: dict[str, type[BaseModel]] = {
    "xrai": XRAIParams,
    "integrated_gradients": IntegratedGradientsParams,
    "guided_gradcam": GuidedParams,
    "guided_backprop": GuidedParams,
}
assert tuple(PARAMS) == METHODS and set(GUIDED_METHODS) <= set(METHODS)
KNOWN_PARAMS = frozenset(name for schema in PARAMS.values() for name in schema.model_fields)  # of any method


def check_method(method: str) -> str:
    if method not in PARAMS:
        raise ExplainError(f"unknown explanation method {method!r}; accepted: {', '.join(METHODS)}")
    return method


def inapplicable_params(method: str, names: Iterable[str]) -> list[str]:
    """Those of `names` that are parameters of another method but not of `method` (a client that keeps one parameter
    dict for every method sends them); names of no method at all are not among them."""
    accepted = PARAMS[check_method(method)].model_fields
    return [name for name in names if name in KNOWN_PARAMS and name not in accepted]


def parse_params(method: str, values: dict[str, Any] | BaseModel | None = None) -> BaseModel:
    """The typed parameters of `method` from `values` (None: the defaults); unknown names are errors."""
    schema = PARAMS[check_method(method)]
    if isinstance(values, schema):
        return values
    if isinstance(values, BaseModel):
        values = values.model_dump()
    try:
        return schema.model_validate(values or {})
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(value)"
            if item["type"] == "extra_forbidden":
                accepted = ", ".join(schema.model_fields) or "none"
                problems.append(f"{where}: not a parameter of {method} (accepted: {accepted})")
            else:
                problems.append(f"{where}: {item['msg']}")
        raise ExplainError(f"invalid parameters for {method}: " + "; ".join(problems)) from None
