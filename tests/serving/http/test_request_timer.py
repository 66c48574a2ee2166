"""BentoML's request timeout, as the service installs it: an answered request leaves no timer behind (each one held
the request for the whole timeout, and the growing heap made Python's garbage collections stall the server), and a
request over the timeout still gets BentoML's 504, and an app that fails before answering fails at once."""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.types import Message, Receive, Scope, Send

from serving.http.request_timer import cancel_request_timers

SCOPE: Scope = {"type": "http", "method": "GET", "path": "/", "headers": []}


def timeout_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    """Live timers of the middleware still scheduled on `loop`."""
    return [h for h in loop._scheduled if not h.cancelled()  # type: ignore[attr-defined]
            and getattr(h._callback, "__name__", "") == "_set_timer_out"]  # type: ignore[attr-defined]


async def answer(delay_s: float, scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(delay_s)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(middleware: TimeoutMiddleware) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(SCOPE, receive, send)
    return sent


def test_answered_requests_leave_no_timer_and_slow_ones_still_get_504() -> None:
    cancel_request_timers()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        quick = TimeoutMiddleware(lambda s, r, se: answer(0, s, r, se), timeout=210)
        for _ in range(20):
            sent = await call(quick)
            assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"
        assert timeout_timers(loop) == []

        slow = TimeoutMiddleware(lambda s, r, se: answer(5, s, r, se), timeout=0.05)
        sent = await call(slow)
        assert sent[0]["status"] == 504
        assert b"Not able to process the request in 0.05 seconds" in sent[1]["body"]
        assert timeout_timers(loop) == []

        async def failing(scope: Scope, receive: Receive, send: Send) -> None:
            raise RuntimeError("broken before answering")

        try:  # the error comes out at once, not after the 210 s timeout (the guard only stops a hang)
            await asyncio.wait_for(call(TimeoutMiddleware(failing, timeout=210)), 30)
        except RuntimeError as error:
            assert str(error) == "broken before answering"
        else:
            raise AssertionError("the app's error was swallowed")
        assert timeout_timers(loop) == []

    asyncio.run(scenario())
