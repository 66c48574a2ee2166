"""within_deadline: the work's answer, a 408 past the deadline, ClientGone when the client leaves, and the cancel
token set whenever the work is abandoned; driven with Starlette's Request on an ASGI receive channel."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from serving.http.deadline import ClientGone, within_deadline
from serving.http.errors import api_error
from serving.runtime.abandon import CancelToken
from serving.runtime.errors import TimedOut


def request_with(disconnect: asyncio.Event) -> Request:
    """A request whose body has been read: the server's next message is the disconnect, once `disconnect` is set."""
    async def receive() -> dict:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": []}, receive)


async def cleaned_up_after(seconds: float, cleanups: list[str]) -> str:
    try:
        await asyncio.sleep(seconds)
        return "answer"
    except asyncio.CancelledError:
        cleanups.append("cancelled")
        raise


def test_work_that_finishes_in_time_answers_and_leaves_the_token_alone() -> None:
    async def run() -> None:
        token, cleanups = CancelToken(), []
        assert await within_deadline(request_with(asyncio.Event()), cleaned_up_after(0.01, cleanups), 5, token,
                                     "/predict") == "answer"
        assert not token.cancelled and cleanups == []
        await asyncio.sleep(0.05)  # nothing cancels the handler later (the watcher is gone)
        assert asyncio.current_task().cancelling() == 0

    asyncio.run(run())


def test_work_past_its_deadline_is_cancelled_and_answers_408() -> None:
    async def run() -> None:
        token, cleanups = CancelToken(), []
        with pytest.raises(TimedOut) as raised:
            await within_deadline(request_with(asyncio.Event()), cleaned_up_after(10, cleanups), 0.05, token,
                                  "/predict on deployment blue")
        assert api_error(raised.value).status == 408 and "request_timeout_ms (50 ms)" in raised.value.message
        assert token.reason == "request timeout" and cleanups == ["cancelled"]

    asyncio.run(run())


def test_a_client_leaving_cancels_the_work_and_raises_client_gone() -> None:
    async def run() -> None:
        token, cleanups, disconnect = CancelToken(), [], asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, disconnect.set)
        with pytest.raises(ClientGone):
            await within_deadline(request_with(disconnect), cleaned_up_after(10, cleanups), 5, token, "/predict")
        assert token.reason == "client disconnected" and cleanups == ["cancelled"]
        assert asyncio.current_task().cancelling() == 0  # our own cancel request is taken back

    asyncio.run(run())


def test_a_cancelled_handler_stays_cancelled_and_sets_the_token() -> None:
    async def run() -> None:
        token, cleanups = CancelToken(), []
        handler = asyncio.ensure_future(within_deadline(request_with(asyncio.Event()), cleaned_up_after(10, cleanups),
                                                        5, token, "/predict"))
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        assert token.reason == "cancelled" and cleanups == ["cancelled"]

    asyncio.run(run())


def test_errors_of_the_work_pass_through() -> None:
    async def failing() -> None:
        raise TimeoutError("the work's own timeout, not the request's")

    async def run() -> None:
        with pytest.raises(TimeoutError, match="the work's own"):
            await within_deadline(request_with(asyncio.Event()), failing(), 5, CancelToken(), "/predict")

    asyncio.run(run())
