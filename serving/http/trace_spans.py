"""One OpenTelemetry span per HTTP request, not one per ASGI message.

BentoML wraps every worker's app in OpenTelemetry's ASGI middleware, which by default opens a child span for each
`receive` and `send` message of a request (`http receive`, `http send` for the response start and for each body
chunk) besides the request's own server span. BentoML records spans whatever its sample rate (so trace ids reach the
access log), and with no exporter configured they are built and thrown away: on the event loop's thread, under the
GIL, for every request. A tiny model served at concurrency 32 on 2 cores (py-spy --gil) spent ~20 % of the event
loop's GIL time in OpenTelemetry; without the message spans, 660-710 became 760-840 requests/s (three runs each), and
server CPU 1.7-1.8 became 1.5-1.6 ms/request. What bounds a GPU server is this per-request cost on the event loop.

The server span stays: it carries the trace id that the access log, Lantern's log lines and `x-request-id` show, and
an operator who configures a tracing exporter still gets one span per request with its status and timing."""

from __future__ import annotations

import functools
from typing import Any

from opentelemetry.instrumentation import asgi

MESSAGE_SPANS = ["receive", "send"]


def drop_message_spans() -> None:
    """Make OpenTelemetry's ASGI middleware skip its per-message spans unless a caller asks otherwise (call before
    BentoML builds the service's app)."""
    middleware = asgi.OpenTelemetryMiddleware
    init = middleware.__init__
    if getattr(init, "drops_message_spans", False):
        return

    @functools.wraps(init)
    def __init__(self: asgi.OpenTelemetryMiddleware, app: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exclude_spans", MESSAGE_SPANS)
        init(self, app, *args, **kwargs)

    __init__.drops_message_spans = True  # type: ignore[attr-defined]
    middleware.__init__ = __init__  # type: ignore[method-assign]
