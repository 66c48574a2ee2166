"""Errors the registry raises for a user to read: each names what was wrong and what is accepted."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError


class LanternError(Exception):
    """An error caused by the user's input; its message is meant to be shown as it is."""


class CheckpointError(LanternError):
    """The checkpoint file cannot be read safely, or its weights do not fit the model."""


class SpecError(LanternError):
    """The model spec, labels or settings are invalid."""


class ParityError(LanternError):
    """ONNX Runtime's output differs from torch's by more than the tolerance."""


class ModelNotFoundError(LanternError):
    """A `models:/` URI names no registered model version."""


MAX_PROBLEMS = 20  # problems named in one message; the rest are counted


def describe_validation_error(error: ValidationError, what: str, unknown: str = "unknown setting",
                              hints: Mapping[str, str] | None = None) -> str:
    """Turn a pydantic error into one readable line per problem, prefixed by `what`. An extra key is called `unknown`,
    followed by its hint (what to use instead) where `hints` has one for its name."""
    problems = []
    for item in error.errors(include_url=False, include_input=False)[:MAX_PROBLEMS]:
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            hint = (hints or {}).get(str(item["loc"][-1])) if item["loc"] else None
            message = f"{unknown} ({hint})" if hint else unknown
        elif item["type"] == "value_error" and "error" in item.get("ctx", {}):  # without pydantic's "Value error, "
            message = str(item["ctx"]["error"])
        problems.append(f"{where}: {message}" if where else message)  # a check of the whole names its fields
    more = error.error_count() - len(problems)
    return f"invalid {what}: " + "; ".join(problems) + (f"; and {more} more" if more > 0 else "")
