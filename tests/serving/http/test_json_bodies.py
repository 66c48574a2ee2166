"""JSON request bodies (serving/http/schemas.py): nesting, encodings, sizes and /score's row limit, refused before the work
they would cost."""

from __future__ import annotations

import json

import pytest

from registry.errors import MAX_PROBLEMS
from serving.http.errors import ApiError
from serving.http.schemas import (
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    MAX_JSON_MEMBERS,
    ExplainRequest,
    load_json,
    nests_too_deeply,
    parse_json_body,
    read_score_rows,
)


def refusal(text: str | bytes, what: str = "the score body") -> ApiError:
    with pytest.raises(ApiError) as raised:
        load_json(text, what)
    return raised.value


@pytest.mark.parametrize("kind", [str, bytes])
def test_a_string_left_open_is_scanned_once(kind: type) -> None:
    """A body whose string never closes, with a quote every other character (`"\\"\\"...`), was rescanned to its end
    from each quote: quadratic, 2.7 s of event loop for 32 KB. 1 MiB of it (hours at that rate) is read in one pass:
    the brackets before it count, those inside it do not, and the parser then says where the JSON went wrong."""
    text = "[]" * 70 + '"' + '\\"' * (1 << 19) + "[" * (MAX_JSON_DEPTH + 1)
    body = text if kind is str else text.encode()
    assert not nests_too_deeply(body)
    opening = "[" if kind is str else b"["
    assert nests_too_deeply(opening * (MAX_JSON_DEPTH + 1) + body)
    refused = refusal(body)
    assert (refused.status, refused.code) == (400, "invalid_json") and "is not valid JSON" in refused.message


def test_hundreds_of_thousands_of_arrays_are_refused_before_parsing() -> None:
    """349 000 nested empty arrays at depth 64 (1 MiB) took Python's parser 0.3 s to build: a body holding more
    arrays and objects than any of Lantern's bodies does is refused from a count."""
    refused = refusal(b"[" * 63 + b"[]," * 349_000 + b"[]" + b"]" * 63)
    assert (refused.status, refused.code) == (400, "invalid_json")
    assert refused.message == f"the score body holds more than {MAX_JSON_CONTAINERS} arrays or objects"
    allowed = [[[]] for _ in range(MAX_JSON_CONTAINERS // 2 - 1)]
    assert load_json(json.dumps(allowed), "x") == allowed


def test_brackets_in_strings_and_after_escapes_do_not_count() -> None:
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    assert nests_too_deeply(deep) and not nests_too_deeply(json.dumps({"a": deep, "b": '\\"' + deep}))
    assert load_json(json.dumps({"a": deep}), "x") == {"a": deep}


@pytest.mark.parametrize("encoding, named", [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16-LE"),
                                             ("utf-16-be", "UTF-16-BE"), ("utf-32", "UTF-32"),
                                             ("utf-32-le", "UTF-32-LE"), ("utf-32-be", "UTF-32-BE")])
def test_json_in_another_encoding_than_utf8_is_400_naming_it(encoding: str, named: str) -> None:
    """Python's parser reads UTF-16 and UTF-32 bytes; JSON between systems is UTF-8 (RFC 8259)."""
    refused = refusal('{"input_data": {"data": []}}'.encode(encoding))
    assert (refused.status, refused.code) == (400, "invalid_json")
    assert refused.message == f"the score body is {named}-encoded; send JSON in UTF-8"


def test_utf8_with_or_without_a_byte_order_mark_is_read() -> None:
    text = '{"label": "crème"}'
    assert load_json(text.encode(), "x") == load_json(b"\xef\xbb\xbf" + text.encode(), "x") == {"label": "crème"}


def test_score_rows_over_the_limit_are_413_before_any_row_is_read() -> None:
    """120 000 tiny rows (each validated and read one by one) are refused once counted, naming the count."""
    rows = ["QUJD"] * 120_000
    body = json.dumps({"input_data": {"columns": ["image"], "data": rows}}).encode()
    with pytest.raises(ApiError) as raised:
        read_score_rows(body, 64)
    assert (raised.value.status, raised.value.code) == (413, "too_many_images")
    assert raised.value.message == "120000 images in one request; the limit is 64"
    exactly = json.dumps({"input_data": {"data": ["QUJD"] * 64}}).encode()
    assert len(read_score_rows(exactly, 64)) == 64


@pytest.mark.parametrize("body, status, named", [
    ({"image_base64": "QUJD", "targets": [1] * 350_000}, 422, "targets: List should have at most 64 items"),
    ({"image_base64": "QUJD", "params": {f"p{i}": i for i in range(MAX_JSON_MEMBERS + 1)}}, 400,
     f"an object holds {MAX_JSON_MEMBERS + 1} names, more than {MAX_JSON_MEMBERS}"),
    ({"image_base64": "QUJD", "params": {f"p{i}": i for i in range(65)}}, 422,
     "params: Dictionary should have at most 64 items"),
])
def test_lists_and_objects_past_any_valid_size_are_refused_before_their_items(body: dict, status: int,
                                                                              named: str) -> None:
    """350 000 bad `targets` were described one by one: a second of work and a 17 MB message."""
    with pytest.raises(ApiError) as raised:
        parse_json_body(json.dumps(body).encode(), ExplainRequest, "explain")
    assert raised.value.status == status and named in raised.value.message, raised.value.message[:300]
    assert len(raised.value.message) < 300


def test_a_message_names_the_first_problems_and_counts_the_rest() -> None:
    body = {"input_data": {"data": [1] * 100}}
    with pytest.raises(ApiError) as raised:
        read_score_rows(json.dumps(body).encode(), 4096)
    message = raised.value.message
    assert raised.value.status == 422 and message.count("input_data.data.") == MAX_PROBLEMS
    assert message.endswith(f"; and {200 - MAX_PROBLEMS} more"), message[-80:]  # each item fails both string and list
