"""Content codings: request bodies sent compressed (`Content-Encoding: gzip` or `deflate`), inflated within the
body-size limit; large answers gzip'd for clients that accept it."""

from __future__ import annotations

import gzip
import zlib

from starlette.responses import Response

from serving.http.errors import ApiError, bad_request, too_large
from serving.http.negotiation import accepts_gzip

IDENTITY = {"", "identity"}
WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_coding(header: str | None) -> str:
    """The body's one content coding ("" for none), or 415 for one Lantern does not inflate (or several stacked)."""
    coding = (header or "").strip().lower()
    if coding in IDENTITY:
        return ""
    if coding in WINDOW_BITS:
        return coding
    raise ApiError(415, "unsupported_content_encoding",
                   f"Content-Encoding {header!r} is not supported: send the body as it is, or compressed with gzip or "
                   "deflate (one of them)")


# Clients send one gzip member; RFC 1952 allows several in a row, read in turn as `gzip` does, up to this many.
MAX_GZIP_MEMBERS = 16
# The compressed body is fed to zlib this much at a time: zlib copies the input it did not use (the rest of the body,
# fed whole) at the end of each member, so a body of many small members would be copied once per member.
INFLATE_INPUT_BYTES = 64 * 1024


def inflate(body: bytes, coding: str, limit: int) -> bytes:
    """`body` decompressed, in time linear in its size; 413 once it inflates past `limit` bytes (a zip bomb costs no
    more than the limit), 400 if it is not valid `coding` data, stops short, or holds more than MAX_GZIP_MEMBERS
    gzip members."""
    view = memoryview(body)
    chunks: list[bytes] = []
    size = position = members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise bad_request(f"the {coding} body holds more than {MAX_GZIP_MEMBERS} gzip members; send one",
                              "invalid_content_encoding")
        inflater = zlib.decompressobj(WINDOW_BITS[coding])
        while not inflater.eof and position < len(body):
            piece = view[position:position + INFLATE_INPUT_BYTES]
            position += len(piece)
            try:
                chunk = inflater.decompress(piece, limit + 1 - size)
            except zlib.error as error:
                raise bad_request(f"the body is not valid {coding} data (Content-Encoding {coding}): {error}",
                                  "invalid_content_encoding") from None
            size += len(chunk)
            if size > limit:  # also where the output limit left input unread (`unconsumed_tail`)
                raise too_large(f"the request body inflates to over the limit of {limit} bytes")
            chunks.append(chunk)
        if not inflater.eof:
            raise bad_request(f"the {coding} body stops short: its compressed data is cut off",
                              "invalid_content_encoding")
        position -= len(inflater.unused_data)  # the start of the next member
        if position >= len(body) or coding == "deflate":
            break
    if position < len(body):
        raise bad_request("the deflate body has data after its end", "invalid_content_encoding")
    return b"".join(chunks)


# Answers ------------------------------------------------------------------------------------------------------------
# Large JSON answers (attributions: 3.5 MB at 224 px as float lists) go gzip'd to clients that accept it, at level 1:
# 2.3x smaller in ~40 ms of a work-pool thread, where level 6 took 5x as long for 8 % less. Smaller answers are sent
# as they are: a few kB saved would not pay for the work.
MIN_COMPRESSED_BYTES = 16 * 1024
GZIP_LEVEL = 1


def compress_answer(response: Response, accept_encoding: str | None) -> Response:
    """`response` gzip'd when its body is large enough and the client accepts gzip (`Vary: Accept-Encoding` on every
    answer that would have been). Takes milliseconds on large bodies: call it off the event loop."""
    if len(response.body) < MIN_COMPRESSED_BYTES or "content-encoding" in response.headers:
        return response
    response.headers["vary"] = "Accept-Encoding"
    if accepts_gzip(accept_encoding):
        response.body = gzip.compress(response.body, GZIP_LEVEL, mtime=0)
        response.headers["content-encoding"] = "gzip"
        response.headers["content-length"] = str(len(response.body))
    return response
