"""Admission: a bounded number of requests in flight and at work, refused at once (Busy) rather than queued
without end; background work (explanation jobs) takes a slot only when no request waits, and gives it up to one
that comes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from serving.runtime.abandon import CancelToken
from serving.runtime.errors import Busy

IDLE_POLL_S = 0.05  # how often background work looks for a free slot


class Admission:
    """At most `active` requests worked on at once, at most twice that in flight; a request that cannot start within
    `max_wait_s` is refused too. Counts are per worker process (one instance)."""

    def __init__(self, what: str, active: int, max_wait_s: float) -> None:
        self.what = what
        self.active = active
        self.limit = 2 * active
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self.waiting = 0  # requests waiting for a slot
        self._slots = asyncio.Semaphore(active)
        self._background: list[CancelToken] = []  # background work holding slots, oldest first

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count a request in flight (429 at once beyond twice the concurrent limit) without taking a slot: a body
        still uploading counts, so slow uploaders are bounded too."""
        if self.in_flight >= self.limit:
            raise Busy(f"{self.what} has {self.in_flight} requests in flight, its limit "
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
                    if self._background:  # background work gives its slot up within one step of its method
                        self._background.pop().cancel("a request needs the slot")
                    self.waiting += 1
                    try:
                        await asyncio.wait_for(self._slots.acquire(), timeout=wait)
                    finally:
                        self.waiting -= 1
                else:
                    await self._slots.acquire()
            except TimeoutError:
                raise Busy(f"{self.what} had no free slot within max_queue_wait_ms "
                               f"({wait * 1000:.0f} ms); retry later") from None
            try:
                yield
            finally:
                self._slots.release()

    async def idle(self) -> None:
        """Once a slot is free and no request waits for one."""
        while self._slots.locked() or self.waiting:
            await asyncio.sleep(IDLE_POLL_S)

    @contextlib.asynccontextmanager
    async def background(self, token: CancelToken) -> AsyncIterator[None]:
        """A slot for background work, taken once one is free and no request waits for one: a request that comes
        while the work runs cancels `token` (the work stops within one step and should be made again later)."""
        await self.idle()
        await self._slots.acquire()  # free, and no one waits: taken at once
        self._background.append(token)
        try:
            yield
        finally:
            if token in self._background:
                self._background.remove(token)
            self._slots.release()
