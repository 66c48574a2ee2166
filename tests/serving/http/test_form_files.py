"""Multipart bodies read with python-multipart from memory: every part whole and in order, limits and malformed bodies
refused with a reason. Bodies are encoded by httpx, as a client sends them."""

from __future__ import annotations

import logging
import os

import pytest

from serving.http.form_files import FormError, FormPart, form_parts
from support.servers import multipart_body


def test_files_and_fields_come_back_whole_and_in_order() -> None:
    large = os.urandom(3 << 20)  # over python-multipart's 1 MiB in-memory default: it must not be cut or spooled
    tricky = b"--not-the-boundary\r\n\r\n" + os.urandom(1000) + b"\r\n"
    content_type, body = multipart_body([("images", ("crème.jpg", large)), ("images", ("b.png", tricky)),
                                  ("other", ("c.bin", b""))], data={"note": "hello"})
    parts = form_parts(content_type, body, max_files=3, max_fields=1)
    assert parts == [FormPart("note", None, b"hello"), FormPart("images", "crème.jpg", large),
                     FormPart("images", "b.png", tricky), FormPart("other", "c.bin", b"")]


@pytest.mark.parametrize("files, fields, message", [
    (2, 0, "Too many files. Maximum number of files is 1."),
    (1, 3, "Too many fields. Maximum number of fields is 2."),
])
def test_more_files_or_fields_than_allowed_are_refused(files: int, fields: int, message: str) -> None:
    content_type, body = multipart_body([("images", (f"{i}.png", b"x")) for i in range(files)],
                                 data={f"field{i}": "v" for i in range(fields)})
    with pytest.raises(FormError) as refusal:
        form_parts(content_type, body, max_files=1, max_fields=2)
    assert str(refusal.value) == message


@pytest.mark.parametrize("content_type, body, message", [
    ("multipart/form-data", b"--x\r\n", "the Content-Type header has no multipart boundary \\(let the HTTP library"),
    ("multipart/form-data; boundary=abc", b"--x\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\n\r\n--x--",
     "the body holds no part marked with the Content-Type's boundary 'abc' \\(let the HTTP library"),
    ("application/json; boundary=x", b"{}", "the body is application/json, not multipart/form-data"),
    ("multipart/form-data; boundary=zzz", b"garbage --zzz",
     "malformed multipart data: Expected boundary character 45, got 103 at index 2"),
    ("multipart/form-data; boundary=zzz", b"--zzz\r\nContent-Type: image/png\r\n\r\nabc\r\n--zzz--\r\n",
     "malformed multipart data: Field name not found in Content-Disposition"),
])
def test_malformed_bodies_are_refused_with_the_reason(content_type: str, body: bytes, message: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(FormError, match=message):
        form_parts(content_type, body, max_files=4, max_fields=4)
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_a_body_cut_short_yields_no_half_file() -> None:
    content_type, body = multipart_body([("images", ("a.png", b"first")), ("images", ("b.png", b"second image"))])
    cut = body[: body.index(b"second") + 3]
    assert form_parts(content_type, cut, max_files=4, max_fields=4) == [FormPart("images", "a.png", b"first")]
