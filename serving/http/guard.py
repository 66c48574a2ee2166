"""What every scoring request goes through around its route's work: the key, routing, the body's upload within the
limits, admission, the deadline, metrics, and the error answers (errors.py's table) with the answering deployment's
headers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from serving.control.auth import bearer_token
from serving.http.deadline import CLIENT_CLOSED, ClientGone, Deadline, within_deadline
from serving.http.errors import ANSWERED, ApiError, api_error, forbidden, timed_out, unauthorized
from serving.http.inputs import read_body, uploaded_files
from serving.runtime.abandon import CancelToken
from serving.runtime.deployment import Deployment
from serving.runtime.endpoint import Endpoint
from serving.runtime.errors import NotReady
from serving.runtime.metrics import metrics
from serving.runtime.routing import Route

logger = logging.getLogger("lantern.serving")
T = TypeVar("T")
# A JSON body over this is parsed in the work pool, where the worker goes on answering other requests meanwhile; a
# body under it is parsed where it is (milliseconds at worst): the thread hop would cost more than the parse.
INLINE_PARSE_BYTES = 128 << 10
# The same for a multipart body (python-multipart's parse grows with the image data).
INLINE_FORM_BYTES = 128 << 10


def endpoint_of(request: Request) -> Endpoint:
    """The worker's endpoint, kept on the ASGI app's state by the BentoML service."""
    endpoint = getattr(request.app.state, "endpoint", None)
    if endpoint is None:
        raise api_error(NotReady("the endpoint is starting"))
    return endpoint


def authenticate(endpoint: Endpoint, authorization: str | None) -> None:
    """A scoring key (unless the endpoint's auth mode is none)."""
    if endpoint.config.auth_mode != "key":
        return
    token = bearer_token(authorization)
    if token is None:
        raise unauthorized("missing scoring key: send the header 'Authorization: Bearer <key>' "
                           "(`lantern endpoint get-credentials` prints the keys)")
    if not endpoint.scoring_keys.accepts(token):
        raise unauthorized("the scoring key is not valid for this endpoint")


def authenticate_admin(endpoint: Endpoint, authorization: str | None) -> None:
    """The admin key, whatever the auth mode: a scoring key is refused with 403."""
    token = bearer_token(authorization)
    if token is None:
        raise unauthorized("missing admin key: send 'Authorization: Bearer <admin key>' (`lantern endpoint "
                           "get-credentials ENDPOINT --key admin` prints it; the CLI reads $LANTERN_ADMIN_KEY)")
    if endpoint.admin_keys.accepts(token):
        return
    if endpoint.scoring_keys.accepts(token):
        raise forbidden("a scoring key cannot change the endpoint: the management API takes the admin key")
    raise unauthorized("the admin key is not valid for this endpoint")


class Context:
    """One request's routed deployment instance (and mirror), its body (read, within the limits, by `handle`) and its
    cancellation token."""

    def __init__(self, route: Route, body: bytes) -> None:
        self.body = body
        self.instance = route.instance
        self.mirror = route.mirror
        self.deployment = route.instance.deployment
        self.token = CancelToken()

    def headers(self) -> dict[str, str]:
        return deployment_headers(self.deployment)


def deployment_headers(deployment: Deployment | None) -> dict[str, str]:
    if deployment is None:
        return {}
    return {"x-lantern-deployment": deployment.name, "x-lantern-model-version": deployment.model_version or ""}


async def handle(request: Request, path: str, explains: Callable[[Endpoint, bytes], Awaitable[bool]] | bool,
                 work: Callable[[Endpoint, Context], Awaitable[Response]]) -> Response:
    """Auth, routing, admission, deadline, metrics and error answers around a route's `work`; `explains` says
    (reading the body once it is in) whether the request takes an explanation slot rather than a prediction one.

    The request holds the deployment generation it was routed to until its answer is ready (an update retires the
    old one only then). Its deadline runs from routing: the body's upload (counted in flight by the deployment's
    admission, so slow uploaders are bounded too), the wait for a slot and the work all come out of it."""
    start = time.perf_counter()
    deployment: Deployment | None = None
    status = 500
    try:
        endpoint = endpoint_of(request)
        authenticate(endpoint, request.headers.get("authorization"))
        route = endpoint.route(request.headers)
        deployment = route.instance.deployment
        settings = deployment.config.request_settings
        deadline = Deadline(settings.request_timeout_ms / 1000)
        what = f"{path} on deployment {deployment.name}"
        with route.instance.serving():
            with route.instance.admission.counted():
                body = await read_body(request, endpoint.config.limits.max_body_bytes, deadline.remaining())
                context = Context(route, body)
                wants_explanation = await reading(explains(endpoint, body), deadline, what) if callable(explains) \
                    else explains
            admission = endpoint.inference.explain_admission if wants_explanation else route.instance.admission
            async with admission.enter(settings.max_queue_wait_ms / 1000):
                response = await within_deadline(request, work(endpoint, context), deadline.remaining(),
                                                 context.token, what)
        response.headers.update(context.headers())
        status = response.status_code
        return response
    except (ApiError, *ANSWERED) as raised:
        error = api_error(raised)
        status = error.status
        if error.status == 408 and deployment is not None:
            metrics().abandoned.labels(deployment.name, path, "timeout").inc()
        return error.response(deployment_headers(deployment))
    except ClientGone:
        status = CLIENT_CLOSED
        if deployment is not None:
            metrics().abandoned.labels(deployment.name, path, "disconnect").inc()
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        logger.exception("unexpected error on %s", path)
        return ApiError(500, "internal_error", "an unexpected error occurred; see the server log").response(
            deployment_headers(deployment))
    finally:
        name = deployment.name if deployment else ""
        metrics().requests.labels(name, path, str(status)).inc()
        metrics().latency.labels(name, path).observe(time.perf_counter() - start)


async def reading(parse: Awaitable[T], deadline: Deadline, what: str) -> T:
    """`await parse` (a body's parse, in the work pool when it is large), or 408 once the deadline passes."""
    try:
        async with asyncio.timeout(deadline.remaining()):
            return await parse
    except TimeoutError:
        raise timed_out(f"{what}: the body was not read within request_timeout_ms "
                        f"({deadline.seconds * 1000:.0f} ms)") from None


async def parse_body(endpoint: Endpoint, body: bytes, parse: Callable[[], T],
                     inline_bytes: int = INLINE_PARSE_BYTES) -> T:
    """`parse()` of a body: in the work pool when the body is over `inline_bytes`, else where it is."""
    return await endpoint.inference.in_thread(parse) if len(body) > inline_bytes else parse()


async def read_uploads(endpoint: Endpoint, request: Request, body: bytes, field: str,
                       max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the files in `field` of the request's multipart `body`."""
    return [(name, data) for _, name, data in await read_upload_fields(endpoint, request, body, (field,), max_files)]


async def read_upload_fields(endpoint: Endpoint, request: Request, body: bytes, fields: tuple[str, ...],
                             max_files: int) -> list[tuple[str, str, bytes]]:
    """(field, filename, bytes) of the files in `fields` of the request's multipart `body`."""
    parse = partial(uploaded_files, request.headers.get("content-type", ""), body, fields, max_files)
    return await parse_body(endpoint, body, parse, INLINE_FORM_BYTES)
