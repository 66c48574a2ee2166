"""What a client accepts (serving/http/negotiation.py): gzip'd answers, and the PNG rather than JSON from /explain."""

from __future__ import annotations

import pytest

from serving.http.negotiation import accepts_gzip, prefers_png, qualities


def test_qualities_read_each_item_and_its_q() -> None:
    assert qualities(" GZIP;q=0.5 , br,, identity; q=2, x;q=oops, br;q=0") == {
        "gzip": 0.5, "br": 1.0, "identity": 1.0, "x": 0.0}  # q clamped to [0, 1]; a repeat keeps the highest
    assert qualities(None) == qualities("") == {}


@pytest.mark.parametrize("header, accepted", [
    ("gzip", True), ("gzip, deflate, br, zstd", True), ("GZIP;q=0.5", True), ("x-gzip", True), ("*", True),
    ("br;q=1, *;q=0.1", True), ("gzip;q=0, *", False), (None, False), ("", False), ("identity", False),
    ("br, deflate", False), ("gzip;q=0", False), ("gzip; q=0.000", False), ("*;q=0", False),
    ("gzip;q=oops", False), ("gzip;q=0, x-gzip;q=1", True)])
def test_which_accept_encoding_headers_admit_gzip(header: str | None, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


@pytest.mark.parametrize("accept, png", [
    ("image/png", True), ("IMAGE/PNG", True), ("image/*", True), ("image/png, application/json", True),
    ("application/json;q=0.5, image/png", True), ("image/*;q=0, image/png", True),
    (None, False), ("", False), ("*/*", False), ("application/json", False), ("image/png;q=0", False),
    ("application/json, image/png;q=0.5", False), ("*/*, image/png;q=0.5", False), ("text/html, */*;q=0.8", False),
    ("image/webp", False), ("image/png;q=0, image/*", False)])
def test_which_accept_headers_get_the_png(accept: str | None, png: bool) -> None:
    assert prefers_png(accept) is png
