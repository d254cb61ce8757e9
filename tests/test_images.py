"""faceid.images: every input is built in memory with Pillow (or by hand), so the suite is fast."""

from __future__ import annotations

import io
import random
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from faceid.errors import ImageError, ImageTooLargeError
from faceid.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decoder_max_pixels,
    is_image_file,
    open_image,
    open_image_scaled,
    to_rgb,
)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    """A random image: compresses badly, so cutting its file in half cuts into the pixel data."""
    channels = len(mode)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit greyscale PNG of any size, all black, made without decoded pixels in memory.
    With `rows`, only that many rows of pixel data follow the header (a file that merely
    declares its size); otherwise the file is complete and valid."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(1)  # level 1: 3x faster than the default here
    idat = compressor.compress(row * (height if rows is None else rows)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def close(pixel, expected, tol=0) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# --- file names -----------------------------------------------------------------------------


def test_is_image_file():
    assert IMAGE_EXTENSIONS[:7] == (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".heic", ".heif")
    assert (".avif" in IMAGE_EXTENSIONS) == features.check("avif")
    for name in ("a.jpg", "b.JPEG", "dir/c.png", "d.WebP", "e.bmp", "IMG_0001.HEIC", "f.heif"):
        assert is_image_file(name)
    for name in ("a.gif", "b.tiff", "c.txt", "jpg", "d.jpg.txt", "pairs.txt"):
        assert not is_image_file(name)


# --- accepted formats and colour modes --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_accepted_formats_give_rgb(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    src = Image.new("RGB", (40, 30), (200, 30, 60))
    out = open_image(encode(src, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert close(out.getpixel((20, 15)), (200, 30, 60), tol=6)


def test_rgb_pixels_are_unchanged_for_lossless_formats():
    src = noise()
    out = open_image(encode(src, "PNG"))
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_path_and_pathlike(tmp_path):
    path = tmp_path / "face.png"
    path.write_bytes(encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG"))
    for source in (path, str(path)):
        out = open_image(source)
        assert out.mode == "RGB" and out.getpixel((0, 0)) == (1, 2, 3)


def test_greyscale_becomes_grey_rgb():
    out = open_image(encode(Image.new("L", (16, 16), 100), "PNG"))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (100, 100, 100)
    out = open_image(encode(Image.new("L", (16, 16), 100), "JPEG"))
    assert close(out.getpixel((3, 3)), (100, 100, 100), tol=2)


def test_one_bit_bmp():
    src = Image.new("1", (16, 16), 0)
    src.paste(1, (0, 0, 8, 16))
    out = open_image(encode(src, "BMP"))
    assert out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((12, 2)) == (0, 0, 0)


def test_rgba_is_composited_over_white():
    src = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    src.paste((0, 0, 255, 255), (0, 0, 8, 8))  # opaque blue
    src.paste((0, 0, 0, 128), (8, 8, 16, 16))  # half-transparent black
    out = open_image(encode(src, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((12, 2)) == (255, 255, 255)  # hidden red must not show through
    assert out.getpixel((2, 2)) == (0, 0, 255)
    assert close(out.getpixel((12, 12)), (127, 127, 127), tol=1)


def test_la_is_composited_over_white():
    src = Image.new("LA", (16, 16), (0, 0))
    src.paste((0, 255), (0, 0, 8, 16))
    out = open_image(encode(src, "PNG"))
    assert out.getpixel((2, 2)) == (0, 0, 0)
    assert out.getpixel((12, 2)) == (255, 255, 255)


def test_palette_with_transparency():
    src = Image.new("P", (16, 16), 0)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    src.paste(1, (0, 0, 8, 16))
    data = encode(src, "PNG", transparency=0)  # index 0 (black) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = open_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (255, 0, 0)
    assert out.getpixel((12, 2)) == (255, 255, 255)


def test_palette_without_transparency():
    src = Image.new("RGB", (16, 16), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = open_image(encode(src, "PNG"))
    assert out.getpixel((2, 2)) == (0, 128, 0)


def test_rgb_colour_key_transparency():
    src = Image.new("RGB", (16, 16), (10, 20, 30))
    src.paste((200, 0, 0), (0, 0, 8, 16))
    out = open_image(encode(src, "PNG", transparency=(10, 20, 30)))
    assert out.getpixel((2, 2)) == (200, 0, 0)
    assert out.getpixel((12, 2)) == (255, 255, 255)


def test_cmyk_jpeg():
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    data = encode(src, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = open_image(data)
    assert out.mode == "RGB"
    assert close(out.getpixel((8, 8)), (255, 0, 0), tol=8)


def test_16bit_greyscale_png_is_scaled_not_clipped():
    levels = np.array([0, 257, 32896, 51400, 65535], dtype=np.uint16)  # 0, 1, 128, 200, 255
    src = Image.fromarray(np.tile(levels, (10, 2)))  # 10 x 10, mode I;16
    data = encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = np.asarray(open_image(data))
    assert out.dtype == np.uint8 and out.shape == (10, 10, 3)
    assert out[0, :5, 0].tolist() == [0, 1, 128, 200, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "int32"])
def test_to_rgb_wide_grey_modes(dtype):
    arr = np.array([[0, 32896, 65535]], dtype=dtype)
    image = Image.fromarray(arr)
    assert image.mode in ("I;16", "I;16B", "I")
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


# --- EXIF orientation -------------------------------------------------------------------------


def sideways(fmt: str, quality: int) -> bytes:
    """40 wide x 20 high, left half red, right half blue, with EXIF orientation 6 ("rotate 90
    degrees clockwise to display": the left edge becomes the top edge)."""
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(src, fmt, quality=quality, exif=exif.tobytes())


def test_exif_orientation_is_applied():
    out = open_image(sideways("JPEG", 95))
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), (255, 0, 0), tol=10)
    assert close(out.getpixel((10, 35)), (0, 0, 255), tol=10)


def test_no_exif_keeps_orientation():
    out = open_image(encode(Image.new("RGB", (40, 20)), "JPEG"))
    assert out.size == (40, 20)


# --- refusals ---------------------------------------------------------------------------------


def test_empty_bytes():
    with pytest.raises(ImageError, match="^empty file"):
        open_image(b"")


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "blank.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="^empty file.*blank.jpg"):
        open_image(path)


def test_missing_path_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="no such file.*nothere.png"):
        open_image(tmp_path / "nothere.png")


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="folder"):
        open_image(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        random.Random(0).randbytes(2000),
        b"<!DOCTYPE html><html><head><title>x</title></head><body>hello</body></html>",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
        b'<circle cx="50" cy="50" r="40"/></svg>',
        b"just some text, certainly not a photo",
    ],
    ids=["random", "html", "svg", "text"],
)
def test_not_an_image(data):
    with pytest.raises(ImageError, match="^not an image.*JPEG, PNG, WebP, BMP") as info:
        open_image(data)
    assert not isinstance(info.value, ImageTooLargeError)


def test_not_an_image_names_the_upload():
    with pytest.raises(ImageError, match="notes.txt"):
        open_image(b"hello", name="notes.txt")


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_other_image_formats_are_refused_by_name(fmt):
    with pytest.raises(ImageError, match=f"unsupported image format.*{fmt}.*JPEG, PNG, WebP, BMP, HEIC/HEIF"):
        open_image(encode(Image.new("RGB", (16, 16)), fmt))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt, tmp_path):
    data = encode(noise(), fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(ImageError, match="truncated|corrupt"):
        open_image(cut)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ImageError, match="cut"):
        open_image(path)


def test_truncated_header():
    data = encode(noise(), "PNG")[:20]
    with pytest.raises(ImageError):
        open_image(data)


def test_loading_truncated_images_is_not_switched_on_globally():
    from PIL import ImageFile

    with pytest.raises(ImageError):
        open_image(encode(noise(), "JPEG")[:600])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("size", [(1, 1), (7, 100), (100, 7)])
def test_too_small(size):
    with pytest.raises(ImageError, match="too small"):
        open_image(encode(Image.new("RGB", size), "PNG"))


def test_min_side_is_configurable():
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    assert open_image(data).size == (8, 8)
    with pytest.raises(ImageError, match="too small"):
        open_image(data, min_side=9)


def test_animated_webp():
    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    with pytest.raises(ImageError, match="animated.*3 frames"):
        open_image(data)


def test_animated_png():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="animated"):
        open_image(data)


def test_mpo_jpeg_gives_its_first_picture():
    # Cameras that append a second picture to a JPEG produce MPO; it is a JPEG still.
    frames = [Image.new("RGB", (24, 16), (255, 0, 0)), Image.new("RGB", (24, 16), (0, 0, 255))]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = open_image(data)
    assert out.size == (24, 16) and close(out.getpixel((5, 5)), (255, 0, 0), tol=8)


# --- phone formats: HEIC and AVIF -------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # made by make_heif.py there


def test_a_heic_photo_opens_as_rgb_from_a_path_and_from_bytes():
    out = open_image(FIXTURES / "scene.heic")
    assert out.mode == "RGB" and out.size == (400, 300)
    assert open_image_scaled((FIXTURES / "scene.heic").read_bytes(), reduce_longer_to=100)[1] == 1
    assert np.array_equal(np.asarray(open_image((FIXTURES / "scene.heic").read_bytes())), np.asarray(out))
    assert np.asarray(out).std() > 20  # a picture, not a flat grey


def test_a_heic_stored_sideways_comes_out_upright_once():
    """A phone stores the picture sideways and says how to turn it: the file's rotation, which
    libheif applies, and an EXIF orientation of 6, which it resets. Turned once, it is the upright
    photo; turned twice it would be upside down."""
    upright = np.asarray(open_image(FIXTURES / "scene.heic"), dtype=np.float32)
    turned = np.asarray(open_image(FIXTURES / "scene-rotated.heic"), dtype=np.float32)
    assert turned.shape == upright.shape
    assert np.abs(turned - upright).mean() < 4
    assert np.abs(np.rot90(turned, 2) - upright).mean() > 20


def test_a_heic_with_two_pictures_gives_its_primary_one():
    """An iPhone's HEIC may hold more than one top-level picture: the one the file marks as primary
    is the photo (here the second; the first is flat grey), and the file is not an animation."""
    out = np.asarray(open_image(FIXTURES / "two-pictures.heic"), dtype=np.float32)
    assert Image.open(FIXTURES / "two-pictures.heic").n_frames == 2
    assert np.abs(out - np.asarray(open_image(FIXTURES / "scene.heic"), dtype=np.float32)).mean() < 1


def test_a_cut_heic_is_refused_as_corrupt():
    data = (FIXTURES / "scene.heic").read_bytes()
    with pytest.raises(ImageError, match="corrupt|truncated"):
        open_image(data[: len(data) // 2], name="IMG_0001.HEIC")


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_avif_opens_upright_and_an_animated_one_is_refused():
    out = open_image(sideways("AVIF", 90))
    assert out.mode == "RGB" and out.size == (20, 40)
    assert close(out.getpixel((10, 5)), (255, 0, 0), tol=30)
    assert close(out.getpixel((10, 35)), (0, 0, 255), tol=30)
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    with pytest.raises(ImageError, match="animated.*2 frames"):
        open_image(encode(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=100))


# --- size limits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A complete, valid PNG of 30000 x 30000 pixels (900 MP) in about 0.5 MB: decoded it would
    take 900 MB as greyscale, 2.7 GB as RGB. Pillow's own limit calls it a bomb too."""
    return black_png(30000, 30000)


def test_decompression_bomb_refused_before_decoding(bomb):
    assert len(bomb) < 1_000_000
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="too large"):
        open_image(bomb)
    assert time.perf_counter() - start < 2.0  # header only; decoding would take far longer


def test_declared_size_alone_is_refused():
    data = black_png(30000, 30000, rows=16)  # a few hundred bytes
    assert len(data) < 5_000
    with pytest.raises(ImageTooLargeError, match="too large"):
        open_image(data)


def test_bomb_refused_even_with_a_high_limit(bomb):
    with pytest.raises(ImageTooLargeError):
        open_image(bomb, max_pixels=10**12)


@pytest.mark.parametrize("max_pixels,limit", [(DEFAULT_MAX_PIXELS, "40,000,000"), (10**12, "89,478,485")])
def test_past_pillows_own_limit_the_message_names_the_size_and_the_limit_in_force(bomb, max_pixels, limit):
    """Pillow refuses 900 MP before our header check can: the message is still ours, with the
    pixel count and the limit that applies (Pillow's, when max_pixels is above it)."""
    with pytest.raises(ImageTooLargeError) as e:
        open_image(bomb, max_pixels=max_pixels, name="big.png")
    assert str(e.value) == (
        f"image too large: big.png has 900,000,000 pixels, over the limit of {limit}; "
        "downscale it (faces need well under 1000 px)"
    )
    assert decoder_max_pixels() == 89_478_485


def test_over_max_pixels_checked_from_header():
    data = black_png(8000, 6000)  # 48 MP: under Pillow's limit, over our default 40 MP
    with pytest.raises(ImageTooLargeError, match="8000x6000.*40,000,000"):
        open_image(data)


def test_pillow_warning_zone_is_an_error_locally_only():
    # Between Image.MAX_IMAGE_PIXELS and twice that, Pillow only warns; we refuse, without
    # changing the process-wide warning filters.
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)
    data = black_png(side, side)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageTooLargeError):
        open_image(data, max_pixels=10**12)
    assert warnings.filters == filters_before


def test_max_pixels_is_configurable():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert open_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageTooLargeError):
        open_image(data, max_pixels=9_999)


def test_too_large_is_an_image_error():
    assert issubclass(ImageTooLargeError, ImageError)


# --- reduced-scale JPEG decoding --------------------------------------------------------------


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: survives any scale."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    return img


@pytest.mark.parametrize(
    "reduce_to,expected",
    [(150, (200, 150)), (300, (400, 300)), (500, (800, 600)), (700, (1600, 1200)), (None, (1600, 1200))],
)
def test_a_large_jpeg_decodes_at_the_smallest_scale_that_keeps_reduce_to(reduce_to, expected):
    data = encode(_halves(1600, 1200), "JPEG", quality=90)
    out = open_image(data, reduce_to=reduce_to)
    assert out.size == expected and out.mode == "RGB"
    assert open_image_scaled(data, reduce_to=reduce_to)[1] == 1600 // expected[0]  # the scale back
    w, h = out.size
    assert close(out.getpixel((w // 4, h // 2)), (255, 0, 0), tol=12)
    assert close(out.getpixel((3 * w // 4, h // 2)), (0, 0, 255), tol=12)


def test_reduce_longer_to_keeps_the_longer_side_and_max_scale_caps_the_reduction():
    data = encode(_halves(1600, 1200), "JPEG", quality=90)
    assert [open_image_scaled(data, reduce_longer_to=k)[0].size for k in (200, 201, 480, 1601)] == [
        (200, 150),
        (400, 300),
        (800, 600),
        (1600, 1200),
    ]
    out, scale = open_image_scaled(data, reduce_longer_to=200, max_scale=2)
    assert out.size == (800, 600) and scale == 2


def test_reduce_to_leaves_other_formats_at_full_size():
    for fmt in ("PNG", "WEBP", "BMP"):
        if fmt == "WEBP" and not features.check("webp"):
            continue
        assert open_image(encode(_halves(800, 600), fmt), reduce_to=100).size == (800, 600)


def test_reduced_decoding_keeps_the_checks_and_the_orientation():
    # limits are judged on the full picture, not the reduced one
    data = encode(_halves(1600, 1200), "JPEG")
    with pytest.raises(ImageTooLargeError, match="1600x1200"):
        open_image(data, reduce_to=100, max_pixels=1_000_000)
    # orientation 6 turns the reduced picture too: the red left half ends on top
    exif = Image.Exif()
    exif[0x0112] = 6
    out = open_image(encode(_halves(1600, 800), "JPEG", quality=95, exif=exif.tobytes()), reduce_to=100)
    assert out.size == (100, 200)
    assert open_image_scaled(encode(_halves(1600, 800), "JPEG", exif=exif.tobytes()), reduce_to=100)[1] == 8
    assert close(out.getpixel((50, 40)), (255, 0, 0), tol=12)
    assert close(out.getpixel((50, 160)), (0, 0, 255), tol=12)
