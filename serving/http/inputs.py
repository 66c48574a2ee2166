"""Reading request bodies: within the size limit and the deadline, inflated, and the files of a multipart body."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from serving.http.content_coding import content_coding, inflate
from serving.http.deadline import ClientGone
from serving.http.errors import ApiError, bad_request, too_large, too_many_images
from serving.http.form_files import FormError, TooManyParts, form_parts
from serving.runtime.images import refuse_url

MAX_FORM_FIELDS = 100  # text fields beside the files: none is read, a few are tolerated


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes; inflated (off the event loop,
    within the same limit) when it came gzip- or deflate-compressed. 408 when it is not all in (and inflated) within
    `timeout_s`; ClientGone when the client leaves before it is."""
    coding = content_coding(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(f"the request body is {int(declared)} bytes, over the limit of {limit}")
        except ValueError:
            raise bad_request("the Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(f"the request body is over the limit of {limit} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
            if coding:
                body = await asyncio.to_thread(inflate, body, coding, limit)
    except TimeoutError:
        came = f"{size} of {declared} bytes" if declared is not None else f"{size} bytes"
        raise ApiError(408, "request_timeout", f"the request body did not arrive within request_timeout_ms "
                                               f"({(timeout_s or 0) * 1000:.0f} ms): {came} came",
                       {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return body


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def uploaded_images(content_type: str, body: bytes, field: str, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in the multipart body's `field`; an unreadable body or a text field in the
    files' place is a 400 saying so."""
    return [(filename, data) for _, filename, data in uploaded_files(content_type, body, (field,), max_files)]


def uploaded_files(content_type: str, body: bytes, fields: tuple[str, ...],
                   max_files: int) -> list[tuple[str, str, bytes]]:
    """(field, filename, bytes) of every file in the multipart body's `fields`."""
    named = " or ".join(repr(name) for name in fields)
    try:
        parts = form_parts(content_type, body, max_files, MAX_FORM_FIELDS)
    except FormError as error:
        if isinstance(error, TooManyParts) and error.kind == "files":  # the limit of /score's rows, refused alike
            raise too_many_images(None, max_files) from None
        raise bad_request(f"the multipart body cannot be read: {error}", "invalid_multipart") from None
    files = []
    for part in parts:
        if part.name not in fields:
            continue
        if part.filename is None:
            refuse_url(part.data.decode("utf-8", errors="replace"), f"form field {part.name!r}", "the image as a file")
            raise bad_request(f"form field {part.name!r} must be a file upload, not text", "not_a_file")
        files.append((part.name, part.filename or part.name, part.data))
    unknown = list(dict.fromkeys(part.name for part in parts if part.name not in fields))
    if unknown and not files:
        raise ApiError(400, "missing_images",
                       f"the multipart body has no {named} files (it has {', '.join(unknown)})")
    return files
