"""Content codings (serving/http/content_coding.py): compressed request bodies (what is inflated, within which limit, and
each refusal) and gzip'd answers."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest
from starlette.responses import JSONResponse, Response

from serving.http.content_coding import MAX_GZIP_MEMBERS, MIN_COMPRESSED_BYTES, compress_answer, content_coding, inflate
from serving.http.errors import ApiError

BODY = b'{"input_data": {"columns": ["image"], "data": ["' + b"QUJD" * 5000 + b'"]}}'


@pytest.mark.parametrize("header, coding", [(None, ""), ("", ""), ("identity", ""), ("gzip", "gzip"),
                                            (" GZIP ", "gzip"), ("x-gzip", "x-gzip"), ("deflate", "deflate")])
def test_the_codings_lantern_inflates(header: str | None, coding: str) -> None:
    assert content_coding(header) == coding


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, gzip", "gzip;q=1"])
def test_other_codings_are_415_naming_the_coding(header: str) -> None:
    with pytest.raises(ApiError) as refused:
        content_coding(header)
    assert refused.value.status == 415 and refused.value.code == "unsupported_content_encoding"
    assert repr(header) in refused.value.message and "gzip or deflate" in refused.value.message


@pytest.mark.parametrize("coding, compressed", [("gzip", gzip.compress(BODY)), ("x-gzip", gzip.compress(BODY)),
                                                ("deflate", zlib.compress(BODY))])
def test_a_compressed_body_inflates_to_the_original(coding: str, compressed: bytes) -> None:
    assert len(compressed) < len(BODY) // 10 and inflate(compressed, coding, len(BODY)) == BODY


def test_concatenated_gzip_members_are_read_in_turn() -> None:
    halves = gzip.compress(BODY[:1000]) + gzip.compress(BODY[1000:])
    assert inflate(halves, "gzip", len(BODY)) == BODY


def test_many_gzip_members_are_refused_and_the_allowed_number_read() -> None:
    """A body of many tiny members (52428 empty ones in 1 MiB) was inflated by copying the rest of the body once per
    member: quadratic. Clients send one member; up to MAX_GZIP_MEMBERS are read, more are a 400."""
    pieces = [BODY[i::MAX_GZIP_MEMBERS] for i in range(MAX_GZIP_MEMBERS)]
    assert inflate(b"".join(gzip.compress(piece) for piece in pieces), "gzip", len(BODY)) == b"".join(pieces)
    for body in (gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1), gzip.compress(b"") * 52428):
        with pytest.raises(ApiError) as refused:
            inflate(body, "gzip", 1 << 20)
        assert refused.value.status == 400 and refused.value.code == "invalid_content_encoding"
        assert f"more than {MAX_GZIP_MEMBERS} gzip members" in refused.value.message


def test_a_large_body_is_inflated_whole_across_input_pieces() -> None:
    """The compressed body is fed to zlib in pieces: a member that spans many of them comes out whole, and the next
    member starts where the first one ended inside a piece."""
    noise = os.urandom(300_000)  # incompressible: several input pieces
    assert inflate(gzip.compress(noise) + gzip.compress(BODY), "gzip", 10 << 20) == noise + BODY
    assert inflate(zlib.compress(noise), "deflate", 10 << 20) == noise


def test_a_body_inflating_past_the_limit_is_413_without_inflating_it_all() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB in about 50 KB
    with pytest.raises(ApiError) as refused:
        inflate(bomb, "gzip", 1_000_000)
    assert refused.value.status == 413 and "inflates to over the limit of 1000000 bytes" in refused.value.message
    two_members = gzip.compress(b"\0" * 600_000) * 2  # each member under the limit, together over it
    with pytest.raises(ApiError, match="over the limit"):
        inflate(two_members, "gzip", 1_000_000)
    assert inflate(gzip.compress(BODY), "gzip", len(BODY)) == BODY  # exactly at the limit is fine


@pytest.mark.parametrize("coding, body, named", [
    ("gzip", BODY, "not valid gzip data"),
    ("gzip", gzip.compress(BODY)[:-20], "stops short"),
    ("deflate", gzip.compress(BODY), "not valid deflate data"),
    ("deflate", zlib.compress(BODY) + b"more", "data after its end"),
    ("gzip", gzip.compress(BODY) + b"\0\0\0\0", "not valid gzip data"),
])
def test_damaged_compressed_bodies_are_400_saying_how(coding: str, body: bytes, named: str) -> None:
    with pytest.raises(ApiError) as refused:
        inflate(body, coding, 10 * len(BODY))
    assert refused.value.status == 400 and refused.value.code == "invalid_content_encoding"
    assert named in refused.value.message


LARGE = {"attributions": [[0.001 * i for i in range(100)]] * 200}


def test_a_large_answer_is_gzipped_for_a_client_that_accepts_it() -> None:
    plain = JSONResponse(LARGE).body
    answer = compress_answer(JSONResponse(LARGE), "gzip, deflate")
    assert answer.headers["content-encoding"] == "gzip" and answer.headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(answer.body) == plain and len(answer.body) < len(plain) // 2
    assert answer.headers["content-length"] == str(len(answer.body))


@pytest.mark.parametrize("header", [None, "identity", "gzip;q=0", "br"])
def test_a_large_answer_goes_as_it_is_to_a_client_that_does_not(header: str | None) -> None:
    answer = compress_answer(JSONResponse(LARGE), header)
    assert "content-encoding" not in answer.headers and answer.headers["vary"] == "Accept-Encoding"
    assert answer.body == JSONResponse(LARGE).body


def test_small_and_already_encoded_answers_go_as_they_are() -> None:
    small = compress_answer(JSONResponse({"probs": [0.5, 0.5]}), "gzip")
    assert "content-encoding" not in small.headers and "vary" not in small.headers
    compressed = gzip.compress(os.urandom(2 * MIN_COMPRESSED_BYTES))
    encoded = compress_answer(Response(compressed, headers={"content-encoding": "gzip"}), "gzip")
    assert encoded.body == compressed and encoded.headers["content-encoding"] == "gzip"
