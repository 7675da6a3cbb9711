"""Decoding image bytes to an RGB PIL image, with what that may cost bounded first.

The formats read, the frame size checked before any pixel is decoded, every mode made 8-bit
RGB; shared by serving (uploads) and training (files).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far from a bomb


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (a decompression bomb or simply too big)."""


# What uploads may be: the formats whose real frame size is known before any pixel is decoded
# (ICO through `_ico_frame_size`; JPEG includes the MPO files of phone cameras). Pillow's other
# formats are refused rather than trusted.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO")
_DRAFT_FORMATS = ("JPEG", "MPO")  # may be decoded at a reduced scale
_REDUCED_SCALES = (2, 4, 8)  # the scales libjpeg decodes at
_ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           target_size: int | None = None, shrink_to_fit: bool = False) -> Image.Image:
    """Decode image bytes to an RGB PIL image.

    Only `ACCEPTED_FORMATS` are read, and the size of the frame that will be decoded is checked
    against `max_pixels` before any pixel is decoded; with `shrink_to_fit`, a JPEG over it is
    decoded at the 1/2, 1/4 or 1/8 scale that fits instead (libjpeg never holds the full-size
    pixels). EXIF orientation is applied, animated and multi-page images give their first
    frame, every mode (CMYK, 16-bit, palette, alpha) becomes 8-bit RGB. When `target_size` is
    given, JPEGs are decoded at a reduced scale that still leaves the shorter side >=
    target_size (much faster for photos).
    """
    if not data:
        raise ImageDecodeError("empty file")
    with _decode_errors():
        img = _open_within(io.BytesIO(data), data[:4], lambda: data, max_pixels=max_pixels,
                           target_size=target_size, shrink_to_fit=shrink_to_fit)
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)


def check_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               shrink_to_fit: bool = False) -> None:
    """Raise what `decode` would raise for the file's format and frame size, from its headers
    alone (no pixel is decoded, and only an ICO is read whole)."""
    with _decode_errors(), path.open("rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        _open_within(fh, head, path.read_bytes, max_pixels=max_pixels, target_size=None,
                     shrink_to_fit=shrink_to_fit).close()


def _open_within(source: BinaryIO, head: bytes, whole: Callable[[], bytes], *,
                 max_pixels: int, target_size: int | None, shrink_to_fit: bool) -> Image.Image:
    """The image opened (not decoded), its frame already known to fit `max_pixels`."""
    if head == _ICO_MAGIC:
        _check_pixels(_ico_frame_size(whole()), max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source, formats=ACCEPTED_FORMATS)
    width, height = img.size
    scale = 1
    if width * height > max_pixels and shrink_to_fit and img.format in _DRAFT_FORMATS:
        scale = next((s for s in _REDUCED_SCALES
                      if math.ceil(width / s) * math.ceil(height / s) <= max_pixels), 1)
    if target_size and img.format in _DRAFT_FORMATS:
        scale = max(scale, reduced_scale(width, height, target_size))
    if scale > 1:  # Pillow picks the largest scale whose result is at least the size asked
        img.draft(None, (width // scale, height // scale))
    _check_pixels(img.size, max_pixels)
    return img


def reduced_scale(width: int, height: int, target_size: int) -> int:
    """The JPEG scale `decode` uses for `target_size`: the largest of 2, 4, 8 that leaves the
    shorter side >= target_size, once the shorter side is over twice it; else 1."""
    if min(width, height) <= 2 * target_size:
        return 1
    return max(s for s in (1, *_REDUCED_SCALES)
               if s <= min(width // target_size, height // target_size))


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's and the parsers' many failures, as ImageDecodeError / ImageTooLargeError."""
    try:
        yield
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a recognised image format (accepted: "
                               f"{', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError,
            KeyError, struct.error) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of {max_pixels:,}")


def _ico_frame_size(data: bytes) -> tuple[int, int]:
    """The largest real frame of an ICO file, read from each embedded PNG or DIB header.

    Pillow decodes an ICO's largest frame while opening it, and the directory's own sizes stop
    at 256: a small icon file can embed a huge PNG. So every frame's header is read first.
    """
    count = struct.unpack_from("<H", data, 4)[0]
    if count == 0:
        raise ImageDecodeError("ICO file holds no images")
    largest = (0, 0)
    for entry in range(count):
        offset = struct.unpack_from("<I", data, 6 + 16 * entry + 12)[0]
        if data[offset:offset + 8] == _PNG_MAGIC:
            width, height = struct.unpack_from(">II", data, offset + 16)  # IHDR
        else:
            width, height = struct.unpack_from("<ii", data, offset + 4)  # BITMAPINFOHEADER
            height //= 2  # a DIB's height counts the image and its AND mask
        size = (abs(width), abs(height))
        if size[0] * size[1] > largest[0] * largest[1]:
            largest = size
    return largest


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img), stretch=img.mode == "F"),
                               "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_BLOCK_PIXELS = 1 << 20  # high bit depths are converted about a megapixel at a time


def _high_depth_to_uint8(arr: np.ndarray, *, stretch: bool) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8, one block of rows at a time.

    Integers above 255 are read as 16-bit (scaled by 255/65535); with `stretch` (float images)
    the range from the minimum to the maximum becomes 0-255. Working in blocks keeps the
    float64 arithmetic to a few megabytes instead of 8 bytes per pixel of the whole image.
    """
    out = np.empty(arr.shape, dtype=np.uint8)
    if not arr.size:
        return out
    lo, hi = float(arr.min()), float(arr.max())
    if stretch:
        offset, scale = lo, (255.0 / (hi - lo) if hi > lo else 1.0)
    else:
        offset, scale = 0.0, (255.0 / 65535.0 if hi > 255 else 1.0)
    rows = max(1, _BLOCK_PIXELS // max(1, arr.shape[1]))
    work = np.empty((min(rows, arr.shape[0]), *arr.shape[1:]), dtype=np.float64)
    for top in range(0, arr.shape[0], rows):
        source = arr[top:top + rows]
        block = work[:len(source)]
        np.copyto(block, source)
        block -= offset
        block *= scale
        out[top:top + rows] = np.clip(block, 0, 255, out=block)
    return out
