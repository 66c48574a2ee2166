"""Base64 image text as clients send it (serving/inputs.py): what is accepted, and what each refusal says."""

from __future__ import annotations

import base64

import pytest

from serving.errors import ApiError
from serving.inputs import decode_base64_image

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
    with pytest.raises(ApiError) as refused:
        decode_base64_image(text, "image_base64")
    assert (refused.value.status, refused.value.code) == (status, code)
    assert refused.value.message.startswith(message), refused.value.message
