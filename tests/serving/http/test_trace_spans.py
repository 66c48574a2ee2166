"""OpenTelemetry's ASGI middleware, built with the arguments and sampler BentoML gives it, records one span per
request once the service has dropped the per-message spans; a caller that names `exclude_spans` still decides."""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.utils.telemetry import ParentBasedTraceIdRatio
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from starlette.types import Message, Receive, Scope, Send

from serving.http.trace_spans import drop_message_spans

SCOPE: Scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/predict", "raw_path": b"/predict",
                "query_string": b"", "scheme": "http", "headers": [(b"host", b"127.0.0.1")],
                "server": ("127.0.0.1", 3000), "client": ("127.0.0.1", 50000)}


class RecordedSpans(SpanProcessor):
    """Every span that ends, sampled or not (BentoML's spans are recorded but not sampled at rate 0: an exporter
    would see none of them, but the middleware builds them all)."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def served_spans(**kwargs: Any) -> tuple[list[Any], list[int]]:
    """One request (a body in two chunks, an answer in two messages) through the middleware as BentoML builds it:
    the spans recorded, and the trace ids the app saw as current."""
    recorded = RecordedSpans()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.0))  # BentoML's: records whatever the rate
    provider.add_span_processor(recorded)
    seen: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        seen.append(trace.get_current_span().get_span_context().trace_id)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = OpenTelemetryMiddleware(app, excluded_urls=None, default_span_details=None,
                                         server_request_hook=None, client_request_hook=None,
                                         tracer_provider=provider, **kwargs)
    chunks: list[Message] = [{"type": "http.request", "body": b"a", "more_body": True},
                             {"type": "http.request", "body": b"b", "more_body": False}]

    async def receive() -> Message:
        return chunks.pop(0)

    async def send(message: Message) -> None:
        pass

    asyncio.run(middleware(dict(SCOPE), receive, send))
    return recorded.ended, seen


def test_one_span_per_request_with_the_trace_id_the_app_sees() -> None:
    drop_message_spans()
    drop_message_spans()  # twice is the same as once

    spans, seen = served_spans()
    assert [span.kind for span in spans] == [trace.SpanKind.SERVER]
    assert seen == [spans[0].context.trace_id] and seen[0] != 0
    assert spans[0].attributes["http.status_code"] == 200


def test_a_caller_naming_exclude_spans_still_gets_the_message_spans() -> None:
    drop_message_spans()
    spans, _ = served_spans(exclude_spans=None)
    names = sorted(span.name for span in spans)
    assert len(spans) == 5, names  # the request, two receives, the answer's start and body
    assert sum(span.kind == trace.SpanKind.SERVER for span in spans) == 1
