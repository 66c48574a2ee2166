"""`x-request-id` on every answer: the request's trace id, as BentoML's access log and Lantern's own log lines show it
(`trace=...`), so a user's report of one request finds its log lines. A client that sends a W3C `traceparent` header
gets its own trace id back."""

from __future__ import annotations

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"


def current_request_id() -> str | None:
    """The current request's trace id in the log's format (32 hex digits), or None outside a traced request."""
    trace_id = trace.get_current_span().get_span_context().trace_id
    return format(trace_id, "032x") if trace_id else None


class RequestIds:
    """ASGI middleware (inside BentoML's OpenTelemetry middleware) adding `x-request-id` to every HTTP answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = current_request_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and request_id:
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
