"""Decoding image bytes with Pillow: EXIF orientation applied, RGB out, pixel count bounded before decoding."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from registry.errors import LanternError

DEFAULT_MAX_PIXELS = 40_000_000
SIXTEEN_BIT_GREY = 65535  # Pillow opens 16-bit greyscale as I;16 (PNG, TIFF) or as 32-bit integer I (PGM)
TIFF_BITS_PER_SAMPLE = 258  # the TIFF tag that says how wide the stored integers are
TRANSPARENT_BACKGROUND = (255, 255, 255)  # what a viewer shows through a transparent PNG on a page: white
REDUCING_GAP = 3.0  # Pillow's term: a JPEG is decoded no smaller than 3x the size it will be resized to


class ImageDecodeError(LanternError):
    """The bytes are not an image Pillow can read."""


class ImageTooLargeError(LanternError):
    """The image declares more pixels than allowed (a decompression bomb is refused before decoding)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, shorter_side: int | None = None) -> Image.Image:
    """Decode `data` into an RGB PIL image, refusing non-images and images over `max_pixels`.

    `shorter_side`: the size the caller will resize the shorter side to. A JPEG at least twice REDUCING_GAP times
    larger is decoded at 1/2, 1/4 or 1/8 scale (Pillow's `draft`: libjpeg's DCT scaling), never below REDUCING_GAP x
    `shorter_side`: a 12 MP phone photo costs half the CPU and a quarter of the memory, and after the resize its
    pixels are within a few grey levels of a full decode's (Pillow's `thumbnail` does the same, with a gap of 2)."""
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:  # no warnings.catch_warnings() here: it is not thread-safe, and servers decode in several threads at once
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
            )
        if shorter_side and image.format == "JPEG":
            needed = math.ceil(shorter_side * REDUCING_GAP)
            if min(width, height) >= 2 * needed:
                image.draft(None, (needed, needed))  # the largest reduction keeping both sides >= needed
        image.load()
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own bound (2 x MAX_IMAGE_PIXELS) under a higher max_pixels
        raise ImageTooLargeError(f"the image was refused as a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("the data is not a readable image (PNG, JPEG, WebP, BMP, GIF, TIFF): its format is "
                               f"not recognised (it starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"the data is not a readable image (PNG, JPEG, WebP, BMP, GIF, TIFF): {error}") from None
    return as_rgb(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says (a phone photo stored landscape with 'rotate 90' is portrait), in
    place: a copy would cost as much as the decoding. A damaged EXIF block leaves the image as stored."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error... on a damaged EXIF block; the
        pass  # pixels are whole, so the image is served as it is (at worst without its orientation applied)
    return image


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. Transparent pixels show white, as a viewer shows them on a page. 16-bit greyscale keeps
    its top byte, as Pillow reads 16-bit colour: Pillow's own `convert` clips it at 255, which turns all but the
    darkest 1/256 of its range white. Floating-point pixels and integers wider than 16 bits have no agreed range (0-1?
    0-255?) and are refused rather than guessed."""
    if has_transparency(image):
        return flattened(image)
    if image.mode == "RGB":
        return image
    if image.mode == "F":
        raise ImageDecodeError("the image's pixels are 32-bit floating point, which have no agreed range (0 to 1? "
                               "0 to 255?): send 8- or 16-bit integer pixels")
    if image.mode == "I" or image.mode.startswith("I;16"):
        bits = stored_bits(image)
        if bits > 16:  # Pillow opens 32-bit TIFF integers as I, like 16-bit PGM: only the file says which it is
            raise ImageDecodeError(f"the image's pixels are {bits}-bit integers, which have no agreed range (0 to 255? "
                                   f"0 to 65535? the full {bits} bits?): send 8- or 16-bit integer pixels")
        values = np.asarray(image)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > SIXTEEN_BIT_GREY:
            raise ImageDecodeError(f"the image's pixels are 32-bit integers from {low} to {high}; integer greyscale "
                                   f"is read as 16-bit, 0 to {SIXTEEN_BIT_GREY}")
        image = Image.fromarray((values.astype(np.uint16) >> 8).astype(np.uint8))
    return image.convert("RGB")


def has_transparency(image: Image.Image) -> bool:
    """An alpha channel (RGBA, LA, PA...), or a palette index or colour marked transparent (GIF, PNG's tRNS). 16-bit
    greyscale's transparent grey level is ignored: Pillow's RGBA conversion of it clips at 255."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return False
    return "A" in image.getbands() or image.info.get("transparency") is not None


def flattened(image: Image.Image) -> Image.Image:
    """`image` over TRANSPARENT_BACKGROUND. Pillow's `convert("RGB")` drops the alpha and keeps the colour stored
    under it, which is black in most transparent PNGs (and any colour in some): a logo on a transparent background
    reached the model as a logo on black, or on noise."""
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def stored_bits(image: Image.Image) -> int:
    """How many bits each stored integer sample has where the file says so (TIFF), else 16: Pillow scales a PGM's
    `maxval` to 16 bits, and PNG's widest greyscale is 16-bit."""
    tags = getattr(image, "tag_v2", None)
    declared = tags.get(TIFF_BITS_PER_SAMPLE) if tags is not None else None
    if isinstance(declared, tuple):
        declared = max(declared, default=None)
    return int(declared) if declared else 16
