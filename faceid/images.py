"""Open untrusted image files and uploads as 8-bit RGB, or fail with a message that names the fix.

Both the CLI (`faceid embed photo.jpg`) and the REST API (`POST /verify` uploads) go through
`open_image`, so a photo is read the same way everywhere:

- only JPEG, PNG, WebP, BMP, HEIC/HEIF (pi-heif's libheif) and AVIF (Pillow's own, where it was
  built with libavif) are accepted, and only those decoders are tried;
- the pixel count is checked from the header *before* any pixel is decoded, so a small file that
  declares a huge image (a decompression bomb) costs nothing;
- truncated or corrupt files fail instead of being padded with grey (Pillow's global
  `ImageFile.LOAD_TRUNCATED_IMAGES` is left alone);
- the EXIF orientation is applied, so a phone photo taken upright comes out upright;
- every colour mode the accepted formats can hold (greyscale, palette, alpha, CMYK, 16-bit) becomes
  plain 8-bit RGB, which is what the model's transforms expect.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from faceid.errors import ImageError, ImageTooLargeError

logger = logging.getLogger(__name__)


# 40 megapixels: above any phone or consumer camera photo, far below what would exhaust memory
# (a 40 MP RGB image decodes to 120 MB).
DEFAULT_MAX_PIXELS = 40_000_000


def decoder_max_pixels() -> int:
    """The most pixels Pillow decodes without a decompression-bomb warning (`Image.MAX_IMAGE_PIXELS`,
    89,478,485 unless changed); a `max_pixels` above it has no effect, so the settings refuse one."""
    return int(Image.MAX_IMAGE_PIXELS or 2**62)


DEFAULT_MIN_SIDE = 8

# Pillow's plugin ids for the formats we decode. MPO is not a format of its own here: it is how
# Pillow reports a JPEG that carries extra pictures (the stereo or preview images some cameras
# append), and its first frame is the ordinary JPEG picture.
_DECODERS = ["JPEG", "PNG", "WEBP", "BMP"]
_ACCEPTED = {"JPEG", "MPO", "PNG", "WEBP", "BMP"}
_NAMES = ["JPEG", "PNG", "WebP", "BMP"]
_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".bmp"]
# Formats whose file may hold several pictures, of which the decoder opens the one the file shows
# (an MPO's first frame, a HEIF's primary image: an iPhone's HEIC can carry more than one).
_PRIMARY_FIRST = {"MPO", "HEIF"}


def _add_format(plugin: str, name: str, *extensions: str) -> None:
    _DECODERS.append(plugin)
    _ACCEPTED.add(plugin)
    _NAMES.append(name)
    _EXTENSIONS.extend(extensions)


try:  # HEIC/HEIF: libheif applies the file's rotation itself and resets the EXIF orientation to 1
    from pi_heif import register_heif_opener
except ImportError:  # pragma: no cover - a dependency; without it HEIC is refused by name
    pass
else:
    register_heif_opener()
    _add_format("HEIF", "HEIC/HEIF", ".heic", ".heif")
if features.check("avif"):  # Pillow 11.3 on, built with libavif (its wheels are)
    _add_format("AVIF", "AVIF", ".avif")
# The file names a folder of photos is scanned for (any case), most usual first.
IMAGE_EXTENSIONS = tuple(_EXTENSIONS)
ACCEPTED_FORMATS = ", ".join(_NAMES)

# Greyscale modes with more than 8 bits per pixel. 16-bit PNGs open as I;16; "I" (32-bit signed)
# is what older Pillow versions and some conversions give for the same data.
_WIDE_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# What decoding can raise for a corrupt or truncated file (Pillow uses SyntaxError for parse
# errors and OSError for "image file is truncated" and "broken data stream").
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)

ImageSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends in one of IMAGE_EXTENSIONS (any case). Does not open it."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    name: str | None = None,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode an image file or the bytes of an upload into an RGB image, EXIF orientation applied.

    Args:
        source: the file's bytes, or a path to it.
        max_pixels: refuse images with more than this many pixels (width * height), checked from
            the header before decoding. Pillow's own decompression-bomb limit
            (`Image.MAX_IMAGE_PIXELS`, see decoder_max_pixels) also applies, reported the same way.
        min_side: refuse images narrower or shorter than this.
        name: what to call the input in messages when `source` is bytes (an upload's file name);
            a path names itself.
        reduce_to: JPEGs only: decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) while the
            shorter side stays at least this many pixels. A 12 MP phone photo then decodes about
            3x faster (bench/decode_speed.py); limits are checked on the full size all the same.

    Returns:
        A fully loaded `PIL.Image.Image` in mode "RGB", detached from any file.

    Raises:
        ImageTooLargeError: more pixels than allowed.
        ImageError: anything else that makes the input unusable (missing, empty, not an image,
            a format not accepted (IMAGE_EXTENSIONS' formats), truncated, animated, too small).
    """
    return open_image_scaled(source, max_pixels=max_pixels, min_side=min_side, name=name, reduce_to=reduce_to)[0]


def open_image_scaled(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    name: str | None = None,
    reduce_to: int | None = None,
    reduce_longer_to: int | None = None,
    max_scale: int = 8,
) -> tuple[Image.Image, int]:
    """`open_image`, and the scale the image was decoded at: 1, or 2, 4 or 8 for a JPEG that
    `reduce_to` (its shorter side) or `reduce_longer_to` (its longer side) let libjpeg reduce, never
    more than `max_scale`. A point at (x, y) in the image is at (x * scale, y * scale) in the
    full-size photo."""
    label, stream = _open_source(source, name)
    try:
        image, full_width = _decode(
            stream,
            label,
            max_pixels=max_pixels,
            min_side=min_side,
            reduce_to=reduce_to,
            reduce_longer_to=reduce_longer_to,
            max_scale=max_scale,
        )
    finally:
        stream.close()
    scale = max(1, round(full_width / image.size[0]))  # before orientation, which may swap the sides
    image = _apply_orientation(image, label)
    return to_rgb(image, label=label), scale


def to_rgb(image: Image.Image, *, label: str = "image") -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB.

    - 16-bit greyscale is scaled (65535 -> 255), not clipped: clipping would turn every pixel
      above 255, i.e. nearly the whole picture, white.
    - Transparency (RGBA, LA, PA, or a palette / colour-key `transparency` entry) is composited
      over white. The colour stored under a transparent pixel is arbitrary (often black, sometimes
      leftovers from an editor), so simply dropping alpha can show content the user never saw.
      White matches how image viewers and browsers display such files, and gives the same
      result for the same picture whatever tool exported it.
    - CMYK, palette, 1-bit and greyscale go through Pillow's conversion (CMYK without an ICC
      transform: fine for faces, not colour-exact).
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _WIDE_GREY_MODES:
        logger.debug("%s: scaling %s greyscale to 8 bits", label, mode)
        return _wide_grey_to_l(image).convert("RGB")
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported colour mode {mode} in {label}: {exc}; save the image as 8-bit RGB") from exc


def _open_source(source: ImageSource, name: str | None) -> tuple[str, BinaryIO]:
    """Return (label for messages, binary stream). Raises ImageError for missing/empty input."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "the upload"
        if len(source) == 0:
            raise ImageError(f"empty file: {label} has 0 bytes; send an image ({ACCEPTED_FORMATS})")
        return label, io.BytesIO(bytes(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"open_image takes bytes or a path, not {type(source).__name__}")
    path = Path(source)
    label = str(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"empty file: {label} has 0 bytes")
        return label, path.open("rb")
    except FileNotFoundError as exc:
        raise ImageError(f"no such file: {label}") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{label} is a folder, not an image file") from exc
    except OSError as exc:
        # Permission denied, a path through a file, a folder on some systems, ...
        if path.is_dir():
            raise ImageError(f"{label} is a folder, not an image file") from exc
        raise ImageError(f"cannot read {label}: {exc.strerror or exc}") from exc


def _too_large(label: str, exc: Exception, max_pixels: int) -> ImageTooLargeError:
    """Pillow's decompression-bomb refusal, told as ours: its message carries the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow decodes"
    return ImageTooLargeError(
        f"image too large: {label} has {pixels}, over the limit of "
        f"{min(max_pixels, decoder_max_pixels()):,}; downscale it (faces need well under 1000 px)"
    )


def _decode(
    stream: BinaryIO,
    label: str,
    *,
    max_pixels: int,
    min_side: int,
    reduce_to: int | None = None,
    reduce_longer_to: int | None = None,
    max_scale: int = 8,
) -> tuple[Image.Image, int]:
    """Identify, size-check, then decode the image in `stream` (still in its own mode): fully, or
    for a JPEG with `reduce_to` (`reduce_longer_to`), at the smallest DCT scale (up to
    1/`max_scale`) that keeps that many pixels on its shorter (longer) side. Returns the image and
    the full-size photo's width."""
    # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises only above twice
    # that; here both are errors. The filter lives in this block only, never process-wide. Note
    # that warnings.catch_warnings is not thread-safe before Python 3.14; that is harmless here,
    # because the explicit max_pixels check below refuses those sizes anyway (unless a caller
    # raises max_pixels above Pillow's limit).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Lazy: reads the header only. Only our decoders are offered the bytes.
            image = Image.open(stream, formats=_DECODERS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(label, exc, max_pixels) from exc
        except UnidentifiedImageError as exc:
            raise _not_accepted(stream, label) from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(
                f"corrupt image: {label} could not be read ({exc}); re-export or re-send the file"
            ) from exc

        fmt = image.format
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image too large: {label} is {width}x{height} = {width * height:,} pixels, over "
                f"the limit of {max_pixels:,}; downscale it (faces need well under 1000 px)"
            )
        if min(width, height) < min_side:
            raise ImageError(f"image too small: {label} is {width}x{height}; both sides must be at least {min_side} px")
        frames = getattr(image, "n_frames", 1)
        if frames > 1 and fmt not in _PRIMARY_FIRST:
            raise ImageError(f"animated image: {label} is a {fmt} with {frames} frames; send a single still image")

        keep, side = (reduce_to, min(width, height)) if reduce_to else (reduce_longer_to, max(width, height))
        if keep and fmt in ("JPEG", "MPO"):
            scale = 8  # libjpeg's reductions: 1/8, 1/4 and 1/2
            while scale > 1 and (scale > max_scale or side // scale < keep):
                scale //= 2
            if scale > 1:  # Pillow picks exactly `scale` for this size
                image.draft(image.mode, (width // scale, height // scale))
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(label, exc, max_pixels) from exc
        except _DECODE_ERRORS as exc:
            raise ImageError(
                f"corrupt or truncated image: {label} ({fmt}, {width}x{height}) could not be "
                f"decoded ({exc}); re-export or re-send the file"
            ) from exc
    return image, width


def _not_accepted(stream: BinaryIO, label: str) -> ImageError:
    """The error for input our decoders refused: name its format if Pillow knows it (GIF, TIFF,
    ...), otherwise say it is not an image at all (HTML, SVG, random bytes, ...)."""
    fmt = None
    try:
        stream.seek(0)
        # Header only, never load(): we just want the format's name for the message.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(stream) as other:
                fmt = other.format
    except Exception:
        fmt = None
    if fmt and fmt not in _ACCEPTED:
        return ImageError(f"unsupported image format: {label} is {fmt}; accepted formats are {ACCEPTED_FORMATS}")
    return ImageError(f"not an image: {label}; accepted formats are {ACCEPTED_FORMATS}")


def _apply_orientation(image: Image.Image, label: str) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (phones store pixels sideways and set tag 6
    or 8). A malformed EXIF block is not worth rejecting a photo over: keep it as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
        return image.copy()  # a plain Image, like exif_transpose returns


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit "L", scaling 0..65535 onto 0..255 (65535 = 255 * 257)."""
    values = np.asarray(image)
    if image.mode == "I":
        # 32-bit signed container; from our formats it only ever holds 16-bit samples.
        values = np.clip(values, 0, 65535)
    scaled = np.rint(values.astype(np.float32) / 257.0).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8 -> mode "L"
