"""Multipart form bodies parsed with python-multipart from the body already in memory.

The body was read within `limits.max_body_bytes`, so every part stays a bytes object. Starlette's `request.form()`
parses on the event loop and spools each file over 1 MiB to a temporary file on disk, only to read it back; this is a
plain function the server runs in its work pool for large bodies."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import Field, File, FormParser, parse_options_header

# the usual cause: a client that sets `Content-Type: multipart/form-data` itself, without the boundary its HTTP library
# writes into the body
NO_HAND_MADE_HEADER = "let the HTTP library write the Content-Type of a multipart body"
# python-multipart logs a WARNING for each malformed body before it raises; the 400 answer says why, and the access log
# shows it, so a client sending bad bodies must not also fill the server's log with a line each.
logging.getLogger("python_multipart").setLevel(logging.ERROR)


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart body: a file upload (with its file name, maybe empty) or a text field (None)."""

    name: str
    filename: str | None
    data: bytes


class FormError(ValueError):
    """The body is not multipart/form-data that can be read, or it holds more files or fields than allowed."""


class TooManyParts(FormError):
    """The body holds more than `limit` parts of one `kind` ("files" or "fields")."""

    def __init__(self, kind: str, limit: int) -> None:
        super().__init__(f"Too many {kind}. Maximum number of {kind} is {limit}.")
        self.kind = kind


def form_parts(content_type: str, body: bytes, max_files: int, max_fields: int) -> list[FormPart]:
    """Every part of `body`, in order; FormError names what is wrong with it."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise FormError(f"the body is {kind.decode('latin-1') or 'untyped'}, not multipart/form-data")
    boundary = options.get(b"boundary")
    if not boundary:
        raise FormError(f"the Content-Type header has no multipart boundary ({NO_HAND_MADE_HEADER})")
    if b"--" + boundary not in body:
        raise FormError(f"the body holds no part marked with the Content-Type's boundary "
                        f"{boundary.decode('latin-1')!r} ({NO_HAND_MADE_HEADER})")
    parts: list[FormPart] = []
    counts = {"files": 0, "fields": 0}

    def counted(kind: str, limit: int) -> None:
        counts[kind] += 1
        if counts[kind] > limit:
            raise TooManyParts(kind, limit)

    def on_file(file: File) -> None:
        counted("files", max_files)
        parts.append(FormPart(text(file.field_name), text(file.file_name), file.file_object.getvalue()))

    def on_field(field: Field) -> None:
        counted("fields", max_fields)
        parts.append(FormPart(text(field.field_name), None, field.value or b""))

    # every file in memory: the body that holds it already is, and it is bounded
    parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary,
                        config={"MAX_MEMORY_FILE_SIZE": len(body) + 1})
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise FormError(f"malformed multipart data: {error}") from None
    return parts


def text(name: bytes | None) -> str:
    """A part's name or file name as text: UTF-8 as browsers send it, undecodable bytes replaced."""
    return (name or b"").decode("utf-8", errors="replace")
