"""The management API under `/manage`, for the admin key only: deployments, traffic, mirror and keys."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, TypeAdapter
from starlette.responses import JSONResponse, Response

from registry.errors import LanternError
from serving.config import DeploymentConfig, Percent
from serving.control.auth import KeyKind
from serving.control.control import Control, DeploymentView, EndpointView, KeyRegenerated
from serving.http.deadline import CLIENT_CLOSED, ClientGone
from serving.http.errors import ANSWERED, ApiError, api_error, unprocessable
from serving.http.guard import authenticate_admin, endpoint_of
from serving.http.inputs import read_body
from serving.http.paths import MANAGEMENT_PREFIX
from serving.http.schemas import inline_schema, parse_json_body

logger = logging.getLogger("lantern.serving")
MAX_BODY_BYTES = 1_000_000
BODY_TIMEOUT_S = 30.0  # a management body not all in by then is a 408
SPLIT = TypeAdapter(dict[str, Percent])
PATCH = TypeAdapter(dict[str, Any])
ADMIN_ERRORS = {status: {"description": text} for status, text in [
    (401, "missing or wrong admin key"), (403, "a scoring key: the management API takes the admin key"),
    (404, "unknown deployment"), (409, "the change conflicts with the endpoint's state (nothing changed)"),
    (422, "invalid body, or a change that breaks a traffic rule (nothing changed)")]}


async def admin_call(request: Request, work: Callable[[Control], Awaitable[Any]], status: int = 200) -> Response:
    """Admin key, then `work`; a refused change answers 4xx naming why, and leaves the state untouched."""
    try:
        endpoint = endpoint_of(request)
        authenticate_admin(endpoint, request.headers.get("authorization"))
        result = await work(Control(endpoint))
        body = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        return JSONResponse(body, status_code=status)
    except (ApiError, *ANSWERED) as error:
        return api_error(error).response()
    except ClientGone:  # it left while its body was being read: nothing changed, and nobody to answer
        return Response(status_code=CLIENT_CLOSED)
    except LanternError as error:
        return unprocessable(str(error), "invalid_change").response()
    except Exception:
        logger.exception("unexpected error on %s", request.url.path)
        return ApiError(500, "internal_error", "an unexpected error occurred; see the server log").response()


async def body_of(request: Request, schema: Any, what: str) -> Any:
    return parse_json_body(await read_body(request, MAX_BODY_BYTES, BODY_TIMEOUT_S), schema, what)


def in_thread(request: Request, func: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """Changes take a file lock and may read the registry: never on the event loop."""
    return endpoint_of(request).inference.in_thread(func, *args)


def state_summary(state: Any) -> dict[str, Any]:
    return {"revision": state.revision, "last_change": state.last_change, "traffic": state.traffic,
            "mirror_traffic": state.mirror_traffic}


def build_router() -> APIRouter:
    router = APIRouter(prefix=MANAGEMENT_PREFIX, tags=["management"], responses=ADMIN_ERRORS)

    @router.get("/endpoint", response_model=EndpointView)
    async def show_endpoint(request: Request) -> Response:
        """The endpoint's state: revision, traffic, mirror, deployments (state in every worker, live counters)."""
        return await admin_call(request, lambda control: in_thread(request, control.view))

    @router.get("/deployments", response_model=list[DeploymentView])
    async def list_deployments(request: Request) -> Response:
        """Every deployment with its state, model version, settings and live counters."""
        async def work(control: Control) -> list[dict[str, Any]]:
            views = await in_thread(request, control.deployments)
            return [view.model_dump(mode="json") for view in views]
        return await admin_call(request, work)

    @router.get("/deployments/{name}", response_model=DeploymentView)
    async def show_deployment(request: Request, name: str) -> Response:
        return await admin_call(request, lambda control: in_thread(request, control.deployment, name))

    @router.post("/deployments", response_model=DeploymentView, status_code=202,
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": inline_schema(DeploymentConfig)}}}})
    async def add_deployment(request: Request) -> Response:
        """Add a deployment with 0 % traffic; it loads and warms up in the background (202: poll its state)."""
        async def work(control: Control) -> DeploymentView:
            config = await body_of(request, DeploymentConfig, "deployment")
            return await in_thread(request, control.add, config)
        return await admin_call(request, work, 202)

    @router.patch("/deployments/{name}", response_model=DeploymentView, status_code=202,
                  openapi_extra={"requestBody": {"required": True, "content": {"application/merge-patch+json": {
                      "schema": {"type": "object"}}}}})
    async def update_deployment(request: Request, name: str) -> Response:
        """Change a deployment's model or settings (JSON merge patch); the new generation is readied, then swapped
        in, while the current one keeps serving."""
        async def work(control: Control) -> DeploymentView:
            patch = await body_of(request, PATCH, "deployment update")
            return await in_thread(request, control.update, name, patch)
        return await admin_call(request, work, 202)

    @router.delete("/deployments/{name}")
    async def remove_deployment(request: Request, name: str) -> Response:
        """Remove a deployment (refused while it has live or mirrored traffic)."""
        async def work(control: Control) -> dict[str, Any]:
            return state_summary(await in_thread(request, control.remove, name))
        return await admin_call(request, work)

    @router.put("/traffic", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}},
        "example": {"blue": 90, "green": 10}}}}})
    async def set_traffic(request: Request) -> Response:
        """Replace the live traffic split (deployments left out get 0 %)."""
        async def work(control: Control) -> dict[str, Any]:
            split = await body_of(request, SPLIT, "traffic")
            return state_summary(await in_thread(request, control.set_traffic, split))
        return await admin_call(request, work)

    @router.put("/mirror-traffic", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 50}},
        "example": {"green": 20}}}}})
    async def set_mirror(request: Request) -> Response:
        """Replace the mirrored share: `{"green": 20}` copies 20 % of live requests to green; `{}` stops it."""
        async def work(control: Control) -> dict[str, Any]:
            split = await body_of(request, SPLIT, "mirror traffic")
            return state_summary(await in_thread(request, control.set_mirror, split))
        return await admin_call(request, work)

    @router.post("/keys/{kind}/regenerate", response_model=KeyRegenerated)
    async def regenerate_key(request: Request, kind: str) -> Response:
        """A new primary, secondary or admin key, shown once in the answer."""
        async def work(control: Control) -> KeyRegenerated:
            if kind not in ("primary", "secondary", "admin"):
                raise ApiError(404, "unknown_key", f"no key {kind!r}; keys: primary, secondary, admin")
            chosen: KeyKind = kind  # type: ignore[assignment]
            return await in_thread(request, control.regenerate, chosen)
        return await admin_call(request, work)

    return router
