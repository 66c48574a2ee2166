"""Query strings: one value per name, and the options of `/explain` for a raw or multipart image."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from registry.errors import describe_validation_error
from serving.http.errors import unprocessable
from serving.http.schemas import ExplainRequest, refuse_deep_nesting


def query_values(request: Request, repeatable: tuple[str, ...] = ()) -> dict[str, str]:
    """The query as one value per name. A name given twice is a 422 (the last would silently win), except the
    `repeatable` ones, whose values are joined with commas (`?targets=circle&targets=square`)."""
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in values:
            values[name] = value
        elif name in repeatable:
            values[name] += "," + value
        else:
            raise unprocessable(f"the query parameter {name} is given more than once", "invalid_query")
    return values


def query_explain_options(request: Request) -> ExplainRequest:
    """`?method=xrai&n_steps=20&targets=circle&attributions_encoding=float16` for raw and multipart images."""
    query = query_values(request, repeatable=("targets",))
    options: dict[str, Any] = {"image_base64": ""}
    for key in ("method", "visualizations", "attributions", "attributions_encoding"):
        if key in query:
            options[key] = query.pop(key)
    if "targets" in query:
        options["targets"] = [t for t in query.pop("targets").split(",") if t]
    params: dict[str, Any] = {}
    for key, value in query.items():
        refuse_deep_nesting(value, f"the query parameter {key}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    options["params"] = params
    try:
        return ExplainRequest.model_validate(options)
    except ValidationError as error:
        raise unprocessable(describe_validation_error(error, "explain query")) from None
