"""Cross-origin calls from browsers (CORS, `cors` in endpoint.yaml): Starlette's middleware, the one BentoML's own
`http.cors` setting adds, installed outside Lantern's unrouted-request answers so that preflights reach it; its
refusals are answered in Lantern's JSON error format."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import Cors
from serving.http.errors import ApiError
from serving.http.paths import MANAGEMENT_PREFIX

METHODS = ["GET", "POST"]  # scoring, health and metrics; the management API is never called cross-origin
REQUEST_HEADERS = ["Authorization", "Content-Type", "Content-Encoding", "Accept", "x-lantern-deployment",
                   "azureml-model-deployment", "traceparent"]
ANSWER_HEADERS = ["x-lantern-deployment", "x-lantern-model-version", "x-lantern-explained-label",
                  "x-lantern-ignored-parameters", "x-request-id", "Retry-After"]


class LanternCors(CORSMiddleware):
    """CORSMiddleware with the endpoint's origins, the headers Lantern's routes take (and the endpoint's
    `allow_headers`) and the ones they answer with."""

    def __init__(self, app: ASGIApp, cors: Cors) -> None:
        self.request_headers = list(REQUEST_HEADERS)
        seen = {name.lower() for name in REQUEST_HEADERS}
        for name in cors.allow_headers:  # each name once, as first spelled (header names ignore case)
            if name.lower() not in seen:
                seen.add(name.lower())
                self.request_headers.append(name)
        super().__init__(app, allow_origins=cors.allow_origins, allow_methods=METHODS,
                         allow_headers=self.request_headers, expose_headers=ANSWER_HEADERS, max_age=cors.max_age)
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The management API is never called cross-origin: its preflights are refused whatever they ask, and its
        answers carry no CORS header (a browser then withholds them from another origin's page)."""
        if scope["type"] == "http" and is_management_path(scope["path"]):
            headers = Headers(scope=scope)
            if scope["method"] == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
                await ApiError(403, "cors_refused", f"cross-origin request refused: the management API "
                                                    f"({MANAGEMENT_PREFIX}) is never called from a browser page on "
                                                    "another origin").response()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        reason = bytes(answer.body).decode()  # "Disallowed CORS origin, method" ...
        cors_headers = {name: value for name, value in answer.headers.items()
                        if name.startswith("access-control-") or name == "vary"}  # not its length and type
        return ApiError(answer.status_code, "cors_refused",
                        f"cross-origin request refused: {reason} (this endpoint allows origins "
                        f"{', '.join(self.cors.allow_origins)}; methods {', '.join(METHODS)}; headers "
                        f"{', '.join(self.request_headers)})", cors_headers).response()


def is_management_path(path: str) -> bool:
    return path == MANAGEMENT_PREFIX or path.startswith(MANAGEMENT_PREFIX + "/")
