"""Draining at shutdown (`lantern serve --drain-seconds N`): on SIGTERM a worker first reports unready for N seconds
while it goes on answering, then stops as before (in-flight requests finish; new connections are refused).

An orchestrator stops routing to an instance once its readiness probe fails, or once it has taken the terminating
instance out of its endpoints, which takes it a moment after the SIGTERM; a server that stopped listening at once
refuses the requests sent meanwhile. During the drain every answer says `Connection: close`, so clients and proxies
that keep connections alive open new ones, which the load balancer sends elsewhere. SIGINT (Ctrl+C) stops at once,
as before; a repeated SIGTERM (one sent to the process group, then forwarded by BentoML's arbiter) changes nothing."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("lantern.serving")
MAX_DRAIN_SECONDS = 3600


class Drain:
    """Whether this worker is draining, and the SIGTERM handler that starts it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False

    def install(self) -> bool:
        """Put the drain in front of the SIGTERM handler the server has installed (uvicorn's, which stops it). Call it
        from the main thread while the server runs; False (nothing changed) without a drain or a handler to defer."""
        stop = signal.getsignal(signal.SIGTERM)
        if self.seconds <= 0 or not callable(stop) or threading.current_thread() is not threading.main_thread():
            return False

        def drain_then_stop(signum: int, frame: FrameType | None) -> None:
            if self.draining:
                return
            self.draining = True
            logger.info("SIGTERM: draining for %g s (unready, still answering, connections closed after each "
                        "answer), then stopping", self.seconds)
            timer = threading.Timer(self.seconds, stop, (signum, None))
            timer.daemon = True
            timer.start()

        signal.signal(signal.SIGTERM, drain_then_stop)
        return True


class CloseWhileDraining:
    """ASGI middleware: while the worker drains, every HTTP answer carries `Connection: close`."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.drain.draining:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"connection"]
                message["headers"] = [*headers, (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)
