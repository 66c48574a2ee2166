"""A request's images as they came (bytes, or base64 text) and their decoding, one at a time in the work pool:
refused with a BadImage naming where the image was and what was wrong with it; URLs are never fetched."""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from PIL import Image

from registry.images import ImageDecodeError, ImageTooLargeError, decode_image
from serving.runtime.errors import BadImage, ImageTooLarge, UnreadableImage

URL_PATTERN = re.compile(r"^\s*[a-zA-Z][a-zA-Z0-9+.-]*://")
DATA_URL_PATTERN = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)
NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")
URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


@dataclass(frozen=True)
class EncodedImage:
    """One image of a request before it is decoded: its bytes, or base64 text (a JSON body's), and where in the
    request it came from (`input_data.data[3]`, a multipart file's name), which a refusal names."""

    data: bytes | str
    where: str

    def decode(self, max_pixels: int, shorter_side: int | None = None) -> Image.Image:
        """The RGB image; a large JPEG is decoded at a reduced scale no smaller than 3 x `shorter_side`."""
        data = decode_base64_image(self.data, self.where) if isinstance(self.data, str) else self.data
        return decode(data, self.where, max_pixels, shorter_side)


def refuse_url(text: str, where: str, instead: str = "the image bytes, base64-encoded") -> None:
    if URL_PATTERN.match(text):
        raise BadImage(f"{where} holds a URL; Lantern never fetches URLs: send {instead}", "url_not_accepted")


def decode_base64_image(text: str, where: str) -> bytes:
    """Image bytes from base64 text: MIME line breaks (as `base64.encodebytes` writes them), data URLs, the URL-safe
    alphabet and left-out `=` padding are all accepted; anything else is refused saying where the text went wrong."""
    refuse_url(text, where)
    compact = text.strip()
    if compact[:5].lower() == "data:":
        compact = DATA_URL_PATTERN.sub("", compact, count=1)
    compact = "".join(compact.split())  # str methods and binascii: faster than a regex pass over the text
    if "-" in compact or "_" in compact:
        compact = compact.translate(URL_SAFE_TO_STANDARD)
    unpadded = compact.rstrip("=")
    try:
        data = binascii.a2b_base64((unpadded + "=" * (-len(unpadded) % 4)).encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError) as error:  # UnicodeEncodeError is a ValueError
        stray = NOT_BASE64.search(compact)
        reason = f"{stray.group()!r} at character {stray.start()}" if stray else str(error)
        raise BadImage(f"{where} is not valid base64: {reason}", "invalid_base64") from None
    if not data:
        raise BadImage(f"{where} is empty", "empty_image")
    return data


def decode(data: bytes, where: str, max_pixels: int, shorter_side: int | None = None) -> Image.Image:
    """An RGB image, or the refusal naming what was wrong (registry/images.py decodes)."""
    try:
        return decode_image(data, max_pixels=max_pixels, shorter_side=shorter_side)
    except ImageTooLargeError as error:
        raise ImageTooLarge(f"{where}: {error}") from None
    except ImageDecodeError as error:
        raise UnreadableImage(f"{where}: {error}") from None
