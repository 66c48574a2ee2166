"""Admission (429 at once rather than an unbounded queue) and deadlines (408, with the work abandoned)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TypeVar

from starlette.requests import Request

from serving.runtime.abandon import CancelToken
from serving.http.errors import timed_out, too_many

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


class Admission:
    """At most `active` requests worked on at once, at most twice that in flight; a request that cannot start within
    `max_wait_s` is refused too. Counts are per worker process (one instance)."""

    def __init__(self, what: str, active: int, max_wait_s: float) -> None:
        self.what = what
        self.active = active
        self.limit = 2 * active
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self._slots = asyncio.Semaphore(active)

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count a request in flight (429 at once beyond twice the concurrent limit) without taking a slot: a body
        still uploading counts, so slow uploaders are bounded too."""
        if self.in_flight >= self.limit:
            raise too_many(f"{self.what} has {self.in_flight} requests in flight, its limit "
                           f"(2 x {self.active} concurrent); retry later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def enter(self, max_wait_s: float | None = None) -> AsyncIterator[None]:
        """Count the request in flight and take a slot to work in (429 when none frees within `max_wait_s`)."""
        wait = self.max_wait_s if max_wait_s is None else max_wait_s
        with self.counted():
            try:
                if self._slots.locked():
                    await asyncio.wait_for(self._slots.acquire(), timeout=wait)
                else:
                    await self._slots.acquire()
            except TimeoutError:
                raise too_many(f"{self.what} had no free slot within max_queue_wait_ms "
                               f"({wait * 1000:.0f} ms); retry later") from None
            try:
                yield
            finally:
                self._slots.release()


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
    raise timed_out(f"{what} did not finish within request_timeout_ms ({timeout_s * 1000:.0f} ms); its work was "
                    "abandoned. Explanations need a long timeout: raise request_settings.request_timeout_ms")
