"""Images as clients send them (serving/http/inputs.py): base64 text and multipart files, what is accepted, and what each
refusal says."""

from __future__ import annotations

import base64

import pytest

from serving.http.errors import ApiError, api_error
from serving.http.inputs import uploaded_images
from serving.runtime.errors import BadImage
from serving.runtime.images import decode_base64_image
from support.servers import multipart_body

PAYLOAD = bytes(range(256)) * 3 + b"\xfb\xff"  # every byte value, and a tail that base64 writes with '+', '/' and '='


@pytest.mark.parametrize("text", [
    base64.b64encode(PAYLOAD).decode(),
    base64.encodebytes(PAYLOAD).decode(),  # the cloud snippet's encoder: a line break every 76 characters
    "data:image/png;base64," + base64.b64encode(PAYLOAD).decode(),
    base64.urlsafe_b64encode(PAYLOAD).decode(),  # '-' and '_' in place of '+' and '/'
    base64.b64encode(PAYLOAD).decode().rstrip("="),  # JavaScript encoders often leave the padding out
    "  " + base64.b64encode(PAYLOAD).decode() + "\n",
])
def test_accepted_spellings_of_base64_give_the_same_bytes(text: str) -> None:
    assert decode_base64_image(text, "image_base64") == PAYLOAD


@pytest.mark.parametrize("text, status, code, message", [
    ("%%%not base64", 400, "invalid_base64", "image_base64 is not valid base64: '%' at character 0"),
    ("QUJD$RA==", 400, "invalid_base64", "image_base64 is not valid base64: '$' at character 4"),
    ("QUJDR", 400, "invalid_base64", "image_base64 is not valid base64: Invalid base64-encoded string"),
    ("QQ=x", 400, "invalid_base64", "image_base64 is not valid base64: Discontinuous padding"),
    ("", 400, "empty_image", "image_base64 is empty"),
    ("https://example.com/cat.png", 400, "url_not_accepted", "image_base64 holds a URL"),
])
def test_refusals_say_what_is_wrong(text: str, status: int, code: str, message: str) -> None:
    with pytest.raises(BadImage) as refused:
        decode_base64_image(text, "image_base64")
    answer = api_error(refused.value)  # as the HTTP side answers it
    assert (answer.status, answer.code) == (status, code)
    assert answer.message.startswith(message), answer.message


def test_uploaded_images_are_the_fields_files_in_order() -> None:
    content_type, body = multipart_body([("images", ("a.png", b"first")), ("other", ("x.bin", b"x")),
                                    ("images", ("b.png", b"second"))], {"note": "kept out"})
    assert uploaded_images(content_type, body, "images", 4) == [("a.png", b"first"), ("b.png", b"second")]


@pytest.mark.parametrize("files, data, code, message", [
    ([("other", ("x.bin", b"x"))], {"images": "https://example.com/cat.png"}, "url_not_accepted",
     "form field 'images' holds a URL; Lantern never fetches URLs: send the image as a file"),
    ([("other", ("x.bin", b"x"))], {"images": "iVBORw0KGgo="}, "not_a_file",
     "form field 'images' must be a file upload, not text"),
    ([("image", ("a.png", b"x"))], {"note": "n"}, "missing_images",
     "the multipart body has no 'images' files (it has note, image)"),
    ([("images", ("a.png", b"x")), ("images", ("b.png", b"y"))], None, "too_many_images",
     "more images in one request than the limit; the limit is 1"),
    ([("images", ("a.png", b"x"))], {f"note{i}": "n" for i in range(101)}, "invalid_multipart",
     "the multipart body cannot be read: Too many fields. Maximum number of fields is 100."),
])
def test_multipart_refusals_say_what_is_wrong(files: list, data: dict | None, code: str, message: str) -> None:
    content_type, body = multipart_body(files, data)
    with pytest.raises((ApiError, BadImage)) as refused:
        uploaded_images(content_type, body, "images", 1)
    answer = api_error(refused.value)
    status = 413 if code == "too_many_images" else 400
    assert (answer.status, answer.code, answer.message) == (status, code, message)
