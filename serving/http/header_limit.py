"""A bound on a request's head (request line and headers): 431 in Lantern's error format, before any work; and
uvicorn's 400 for bytes that are not HTTP in that format too.

uvicorn's httptools protocol (the one BentoML's workers run) buffers a request's headers without a limit, so one
unauthenticated request could make a worker hold megabytes of header before any route saw it. Its h11 protocol has a
limit of its own (`h11_max_incomplete_event_size`) and is left as it is."""

from __future__ import annotations

import json

from uvicorn import config as uvicorn_config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 32 * 1024  # nginx's default allows 4 x 8 KiB; a bearer key and a traceparent take under 1 KiB
LINGER_S = 2.0  # after a 431, how long the rest of what the client sends is read and dropped


def closing_answer(status: bytes, code: str, message: str) -> bytes:
    """A whole HTTP answer with Lantern's JSON error, saying the connection closes after it."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def head_too_large_answer(limit: int = MAX_HEAD_BYTES) -> bytes:
    """431 for a request line and headers over `limit` bytes."""
    return closing_answer(b"431 Request Header Fields Too Large", "headers_too_large",
                          f"the request line and headers are over the limit of {limit} bytes; send large data in the "
                          "body")


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering 431 once a request's head (its request line and headers, up to the empty
    line that ends them) passes MAX_HEAD_BYTES, before the parser is given the bytes that pass it.

    The connection is then closed the way servers close one they will read no more of: the answer and the end of the
    stream are sent, what the client still sends is dropped, and the socket is closed when the client closes it (or
    LINGER_S later), so that the client reads the answer rather than a reset."""

    head_limit = MAX_HEAD_BYTES

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def, override]
        self._refused = False
        self._next_head()
        super().connection_made(transport)

    def _next_head(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._next_head()  # a kept-alive connection's next request starts with its head

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            window = self._tail + data  # the end of the head may straddle two reads
            end = window.find(b"\r\n\r\n")
            size = self._head_bytes - len(self._tail) + (end + 4 if end >= 0 else len(window))
            if size > self.head_limit:
                self._refuse()
                return
            if end >= 0:
                self._in_head = False
            else:
                self._head_bytes, self._tail = size, window[-3:]
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP (a NUL in a header, a malformed request line), in Lantern's
        error format rather than plain text."""
        self.transport.write(closing_answer(b"400 Bad Request", "invalid_http",
                                            f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})"))
        self.transport.close()

    def _refuse(self) -> None:
        self._refused = True
        self.transport.write(head_too_large_answer(self.head_limit))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


def bound_request_heads() -> None:
    """Make uvicorn's `http="auto"` and `"httptools"` settings use BoundedHeadProtocol (call before the worker's
    server is configured: BentoML imports the service first)."""
    path = f"{__name__}:{BoundedHeadProtocol.__name__}"
    if uvicorn_config.HTTP_PROTOCOLS["auto"].endswith("AutoHTTPProtocol"):
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        if AutoHTTPProtocol is HttpToolsProtocol:
            uvicorn_config.HTTP_PROTOCOLS["auto"] = path
    uvicorn_config.HTTP_PROTOCOLS["httptools"] = path
