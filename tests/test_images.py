"""Decoding image bytes (registry/images.py): orientation, colour modes and refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from registry.images import ImageDecodeError, ImageTooLargeError, decode_image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_exif_orientation_is_applied() -> None:
    """A phone photo stored landscape with 'rotate 90' in its EXIF comes out portrait, its top row where it belongs."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    image = decode_image(encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes()))
    assert image.size == (20, 40) and image.mode == "RGB"
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[-3, 10]
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert image.getexif().get(0x0112, 1) == 1  # no orientation is left to apply twice


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "RGB"])
def test_every_colour_mode_comes_out_rgb(mode: str) -> None:
    image = Image.new("RGB", (16, 12), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = decode_image(encoded(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (16, 12)


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"%PDF-1.7 not an image")
    with pytest.raises(ImageTooLargeError, match="over the limit of 100"):
        decode_image(encoded(Image.new("RGB", (20, 20)), "PNG"), max_pixels=100)


@pytest.mark.parametrize("fmt", ["WEBP", "JPEG", "PNG"])
def test_a_damaged_exif_block_does_not_lose_the_image(fmt: str) -> None:
    """An EXIF block whose TIFF header is damaged made Pillow raise SyntaxError while reading the orientation (a 500
    for a WebP): the pixels are whole, so the image is decoded as stored."""
    damaged_exif = b"Exif\x00\x00kM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"
    stored = Image.new("RGB", (24, 16), (10, 200, 30))
    image = decode_image(encoded(stored, fmt, exif=damaged_exif, **({"quality": 100} if fmt != "PNG" else {})))
    assert image.size == (24, 16) and image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - (10, 200, 30)).max() < 16


def test_an_unknown_format_is_named_by_its_first_bytes() -> None:
    with pytest.raises(ImageDecodeError, match=r"not recognised \(it starts with b'%PDF-1.7'\)") as refused:
        decode_image(b"%PDF-1.7 not an image")
    assert "object at 0x" not in str(refused.value)  # no Python object's repr in a message meant for users


def test_our_pixel_limit_decides_below_pillows_hard_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow warns past MAX_IMAGE_PIXELS and refuses past twice that. The configured limit decides up to Pillow's
    refusal (no warnings filter: it would not be thread-safe); past it, the refusal is a 413-style ImageTooLargeError."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    out = io.BytesIO()
    Image.new("RGB", (60, 60), (10, 20, 30)).save(out, format="PNG")  # 3600 pixels: between 1x and 2x Pillow's bound
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(out.getvalue(), max_pixels=10_000).size == (60, 60)
    with pytest.raises(ImageTooLargeError, match="over the limit of 1000"):
        decode_image(out.getvalue(), max_pixels=1000)
    big = io.BytesIO()
    Image.new("RGB", (100, 100)).save(big, format="PNG")  # 10000 pixels: past twice Pillow's bound
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(big.getvalue(), max_pixels=1_000_000)
