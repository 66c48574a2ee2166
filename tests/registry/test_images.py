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


def test_training_turns_a_photo_as_serving_does(tmp_path) -> None:
    """Training read the stored pixels (sideways for a phone photo with 'rotate 90'), serving the upright image:
    a model trained on such photos was shown them turned by 90 degrees once served."""
    from training.datasets import load_uint8

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes()))
    trained_on = load_uint8(path).permute(1, 2, 0).numpy()
    assert trained_on.shape == (40, 20, 3)
    assert np.array_equal(trained_on, np.asarray(decode_image(path.read_bytes())))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "RGB"])
def test_every_colour_mode_comes_out_rgb(mode: str) -> None:
    image = Image.new("RGB", (16, 12), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    decoded = decode_image(encoded(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (16, 12)


def grey_ramp() -> np.ndarray:
    """A 16-bit greyscale ramp over the whole 0-65535 range, as a 16-bit camera or scanner writes one."""
    return np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(fmt: str) -> None:
    """Pillow opens it as I;16 (PNG, TIFF) or I (PGM), and its `convert("RGB")` clips at 255: all but the darkest
    1/256 of the ramp came out white, and the model was shown a blank image."""
    ramp = grey_ramp()
    decoded = np.asarray(decode_image(encoded(Image.fromarray(ramp), fmt)))
    assert decoded.shape == (48, 64, 3) and (decoded == decoded[..., :1]).all()
    assert np.abs(decoded[..., 0].astype(int) - ramp / 257).max() <= 1  # the ramp's own grey levels, 0 to 255


def test_training_reads_sixteen_bit_images_as_serving_does(tmp_path) -> None:
    from training.datasets import load_uint8

    path = tmp_path / "ramp.png"
    path.write_bytes(encoded(Image.fromarray(grey_ramp()), "PNG"))
    assert np.array_equal(load_uint8(path).permute(1, 2, 0).numpy(), np.asarray(decode_image(path.read_bytes())))


def test_pixels_without_an_agreed_range_are_refused_not_guessed() -> None:
    floats = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    with pytest.raises(ImageDecodeError, match="32-bit floating point.*send 8- or 16-bit integer pixels"):
        decode_image(encoded(Image.fromarray(floats), "TIFF"))
    wide = np.full((12, 16), 70_000, np.int32)
    with pytest.raises(ImageDecodeError, match="32-bit integers, which have no agreed range.*send 8- or 16-bit"):
        decode_image(encoded(Image.fromarray(wide), "TIFF"))


def test_a_32_bit_tiff_is_refused_whatever_its_values() -> None:
    """Pillow opens a 32-bit integer TIFF as mode I, as it opens a 16-bit PGM: read as 16-bit, one holding 8-bit
    values (0-255) reached the model nearly black. The file's BitsPerSample tells them apart."""
    eight_bit_values = np.tile(np.arange(0, 256, 16, dtype=np.int32), (12, 1))
    with pytest.raises(ImageDecodeError, match="32-bit integers, which have no agreed range"):
        decode_image(encoded(Image.fromarray(eight_bit_values), "TIFF"))
    pgm = decode_image(encoded(Image.fromarray((eight_bit_values * 257).astype(np.uint16)), "PPM"))
    assert np.array_equal(np.asarray(pgm)[..., 0], eight_bit_values)  # a 16-bit PGM, also mode I, is still read


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


def photo_like(width: int, height: int) -> Image.Image:
    """Smooth colour gradients with sharp-edged discs and some noise: edges and texture, like a photograph."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([128 + 100 * np.sin(6 * x), 128 + 100 * np.cos(5 * y), 255 * x * y], axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.15)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_crop() -> None:
    """A JPEG whose shorter side is at least 2 x 3 x the resize target is decoded at 1/2, 1/4 or 1/8 scale, never
    below 3 x the target; resized and cropped, it matches the full decode's crop within a few grey levels."""
    from registry.preprocess import Preprocess

    data = encoded(photo_like(2400, 1800), "JPEG", quality=92)
    full = decode_image(data)
    reduced = decode_image(data, shorter_side=256)
    assert full.size == (2400, 1800)
    assert reduced.size == (1200, 900) and reduced.mode == "RGB"  # 1800 // 768 = 2: half scale, and >= 768
    assert decode_image(data, shorter_side=128).size == (600, 450)  # 1800 // 384 = 4: a quarter, >= 384
    preprocess = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    difference = np.abs(np.asarray(preprocess.crop(full), np.int16) - np.asarray(preprocess.crop(reduced), np.int16))
    print(f"reduced-scale crop vs full decode: mean {difference.mean():.3f}, max {difference.max()} grey levels")
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 4


@pytest.mark.parametrize("fmt,size", [("PNG", (2400, 1800)), ("JPEG", (2000, 1535))])
def test_other_images_are_decoded_at_full_size(fmt: str, size: tuple[int, int]) -> None:
    """Only JPEG has a reduced-scale decode, and only from twice the needed size (a 1535 px side is under 2 x 768)."""
    assert decode_image(encoded(photo_like(*size), fmt), shorter_side=256).size == size


def test_a_reduced_scale_decode_keeps_the_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display: stored 1600 x 1600 // 2 landscape, shown portrait
    image = photo_like(3200, 1600)
    image.paste((255, 0, 0), (0, 0, 1600, 1600))  # stored left half red: after the rotation it is the top
    decoded = decode_image(encoded(image, "JPEG", quality=90, exif=exif.tobytes()), shorter_side=256)
    assert decoded.size == (800, 1600)  # 1600 // 768 = 2: half scale, then rotated
    top = np.asarray(decoded)[100, 400]
    assert top[0] > 200 and top[1] < 60, top


def transparent_top(mode: str) -> bytes:
    """A PNG (GIF for P) whose top half is opaque red and bottom half transparent, with black stored under it."""
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:4] = (255, 0, 0, 255)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        return encoded(image.convert("LA"), "PNG")
    if mode == "tRNS":  # RGB with one colour marked transparent
        return encoded(image.convert("RGB"), "PNG", transparency=(0, 0, 0))
    if mode == "PNG-8":  # a palette PNG with an alpha per palette entry, as pngquant and TinyPNG write them
        return encoded(image.quantize(4), "PNG")
    if mode == "P":  # index 0 red, index 1 black and transparent
        indexed = Image.fromarray((np.arange(8)[:, None] >= 4).repeat(8, 1).astype(np.uint8), "P")
        indexed.putpalette([255, 0, 0, 0, 0, 0])
        return encoded(indexed, "GIF", transparency=1)
    return encoded(image, "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PNG-8", "tRNS"])
def test_transparent_pixels_show_white_not_the_colour_stored_under_them(mode: str) -> None:
    """Pillow's convert("RGB") drops the alpha: a logo on a transparent background reached the model on black."""
    decoded = np.asarray(decode_image(transparent_top(mode)))
    assert (decoded[4:] == 255).all(), decoded[4:, 0]
    top = decoded[0, 0]
    assert tuple(top) == ((76, 76, 76) if mode == "LA" else (255, 0, 0))  # the opaque half as stored


def test_half_transparent_pixels_are_blended_over_white() -> None:
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[...] = (0, 0, 255, 128)
    decoded = np.asarray(decode_image(encoded(Image.fromarray(pixels, "RGBA"), "PNG")))
    assert np.abs(decoded.astype(int) - (127, 127, 255)).max() <= 1


def test_training_flattens_transparency_as_serving_does(tmp_path) -> None:
    from training.datasets import load_uint8

    path = tmp_path / "logo.png"
    path.write_bytes(transparent_top("RGBA"))
    assert np.array_equal(load_uint8(path).permute(1, 2, 0).numpy(), np.asarray(decode_image(path.read_bytes())))
