"""Cross-origin calls from browsers (CORS, `cors` in endpoint.yaml): Starlette's middleware, the one BentoML's own
`http.cors` setting adds, installed outside Lantern's unrouted-request answers so that preflights reach it; its
refusals are answered in Lantern's JSON error format."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from serving.config import Cors
from serving.errors import ApiError

METHODS = ["GET", "POST"]  # scoring, health and metrics; the management API is never called cross-origin
REQUEST_HEADERS = ["Authorization", "Content-Type", "Content-Encoding", "Accept", "x-lantern-deployment",
                   "azureml-model-deployment", "traceparent"]
ANSWER_HEADERS = ["x-lantern-deployment", "x-lantern-model-version", "x-lantern-explained-label", "x-request-id",
                  "Retry-After"]


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
