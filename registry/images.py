"""Decoding image bytes with Pillow: EXIF orientation applied, RGB out, pixel count bounded before decoding."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from registry.errors import LanternError

DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(LanternError):
    """The bytes are not an image Pillow can read."""


class ImageTooLargeError(LanternError):
    """The image declares more pixels than allowed (a decompression bomb is refused before decoding)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` into an RGB PIL image, refusing non-images and images over `max_pixels`."""
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:  # no warnings.catch_warnings() here: it is not thread-safe, and servers decode in several threads at once
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
            )
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
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: each of these would otherwise copy the whole image
    except Exception:  # noqa: BLE001 - Pillow raises SyntaxError, struct.error... on a damaged EXIF block; the
        pass  # pixels are whole, so the image is served as it is (at worst without its orientation applied)
    return image if image.mode == "RGB" else image.convert("RGB")
