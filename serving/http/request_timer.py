"""BentoML's request timeout (`traffic.timeout`) with its timer cancelled when the request is answered.

BentoML 1.4's `TimeoutMiddleware` starts a `loop.call_later(timeout, ...)` for every request and never cancels it, so
each answered request stays referenced by the event loop for the whole timeout (Lantern's is 210 s: the longest
`request_timeout_ms` plus a margin): its future and its context, which holds the request's OpenTelemetry span. At a
few hundred requests a second the worker's heap grew by ~400 objects a second, and Python's full garbage
collections, which walk it all, grew to 400 ms: every request in flight stalled that long every two seconds (a tiny
model served at concurrency 32 had p99 480 ms; resnet50 on an H100 fell to 3 % of its in-process throughput). The
fixed middleware answers like BentoML's (504 JSON when the timeout passes), cancels its timer once the answer starts,
and lets an app's error through at once rather than after the timeout."""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send


async def _timed_call(self: traffic.TimeoutMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] not in ("http", "websocket"):
        await self.app(scope, receive, send)
        return
    loop = asyncio.get_running_loop()
    started = loop.create_future()  # done once the answer starts (or the timeout passes first)
    timer = loop.call_later(self.timeout, self._set_timer_out, started)

    async def send_started(message: Message) -> None:
        if not started.done():
            started.set_result(None)
        await send(message)

    work = asyncio.ensure_future(self.app(scope, receive, send_started))
    try:  # also done when the app fails before it answers (BentoML's waited for the timeout then)
        await asyncio.wait((started, work), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
    timed_out = started.done() and started.exception() is not None
    if timed_out and work.cancel():
        await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                           status_code=504)(scope, receive, send)
        return
    await work


def cancel_request_timers() -> None:
    """Make BentoML's TimeoutMiddleware cancel its timer (call before the service's app is built)."""
    traffic.TimeoutMiddleware.__call__ = _timed_call  # type: ignore[method-assign]
