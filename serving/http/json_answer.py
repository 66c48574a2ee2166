"""JSON answers, encoded with orjson; NaN or infinity, which JSON cannot carry, are refused (424) rather than sent.

The standard library's encoder holds the GIL for the whole of a body: 100 ms for 224 px float32 attributions (3.5 MB),
during which no other thread of the worker, its event loop included, ran, wherever the encoding was called from.
orjson writes the same numbers (each float's shortest repr; exponents as `1e-5`, not `1e-05`) in 4 ms."""

from __future__ import annotations

import math
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response

from serving.http.errors import ApiError


def all_finite(value: Any) -> bool:
    """Whether every float in a JSON-ready value (dicts, lists, scalars) is finite. Python-level: a long walk lets
    other threads in between its steps, as one C call would not."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(item) for item in value.values())
    if isinstance(value, list):
        if value and all(type(item) is float for item in value):  # a row of numbers: one C loop
            return all(map(math.isfinite, value))
        return all(all_finite(item) for item in value)
    return True


def json_response(model: BaseModel | list[BaseModel]) -> Response:
    """The answer as JSON; NaN or infinity can only come from the model: a 424."""
    content = [item.model_dump(exclude_none=True) for item in model] if isinstance(model, list) \
        else model.model_dump(exclude_none=True)
    if not all_finite(content):
        raise ApiError(424, "model_error", "the model's outputs for this input are not finite numbers (NaN or "
                                           "infinity), so there is no answer to give")
    # keys as the standard encoder takes them: a dict keyed by label index writes its keys as strings
    return Response(orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS), media_type="application/json")
