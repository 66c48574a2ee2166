"""A request's deadline (`request_timeout_ms`, from routing) and the wait for its work that gives up when the deadline
passes (TimedOut) or the client leaves (ClientGone), cancelling the work's token so threads stop too."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from serving.runtime.abandon import CancelToken
from serving.runtime.errors import TimedOut

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


class Deadline:
    """A request's time budget (`request_timeout_ms`), counted from the moment it is routed: the body's upload, the
    wait for a slot and the work all come out of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())


CLIENT_CLOSED = 499  # the status logged and counted for a request whose client left before its answer (nginx's)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Return when the client goes away. The body has been read, so the server's next message is the disconnect:
    waiting for it costs nothing, where polling `is_disconnected()` ran the middleware stack 4 times a second for
    every request in flight (a third of the event loop's time at 32 concurrent predictions)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(DISCONNECT_POLL_S)  # a server that sends more (empty) body messages: keep asking, slowly


async def within_deadline(request: Request, work: Awaitable[T], timeout_s: float, token: CancelToken,
                          what: str) -> T:
    """`await work`, unless `timeout_s` passes (408) or the client goes away (ClientGone); in both cases the token is
    cancelled so work running in threads stops too."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        token.cancel("cancelled")
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    gone = watcher in done and not watcher.cancelled()
    token.cancel("client disconnected" if gone else "request timeout")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if gone:
        raise ClientGone()
    raise TimedOut(f"{what} did not finish within request_timeout_ms ({timeout_s * 1000:.0f} ms); its work was "
                    "abandoned. Explanations need a long timeout: raise request_settings.request_timeout_ms")
