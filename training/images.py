"""Decoding images for training and evaluation within a pixel budget.

An image within `max_pixels` is decoded exactly as the server decodes it
(`models.decoding.decode`). A larger JPEG (a 48 MP phone photo) is decoded at the 1/2, 1/4
or 1/8 scale that fits the budget, which libjpeg does without ever holding the full-size
pixels; any other format over the budget cannot be reduced before decoding and is refused, as
is anything Pillow itself calls a decompression bomb.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from models.decoding import ImageDecodeError, ImageTooLargeError, decode

logger = logging.getLogger(__name__)

REDUCIBLE_FORMATS = ("JPEG", "MPO")
_SCALES = (2, 4, 8)  # the reduced scales libjpeg decodes at
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, KeyError,
                  struct.error)


def reduction_for(size: tuple[int, int], image_format: str | None, max_pixels: int
                  ) -> int | None:
    """The decode scale divisor that fits `max_pixels` (1: none needed; None: impossible)."""
    width, height = size
    if width * height <= max_pixels:
        return 1
    if image_format not in REDUCIBLE_FORMATS:
        return None
    return next((s for s in _SCALES
                 if math.ceil(width / s) * math.ceil(height / s) <= max_pixels), None)


def _too_large(size: tuple[int, int], max_pixels: int) -> str:
    width, height = size
    return (f"{width}x{height} = {width * height:,} pixels, over the --max-pixels budget of "
            f"{max_pixels:,} (only JPEGs can be decoded at a reduced scale)")


def _open(source: Path | io.BytesIO) -> Image.Image:
    """Image.open with Pillow's bomb warning silenced (its bomb error still raised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def skip_reason(path: Path, max_pixels: int) -> str | None:
    """Why the image at `path` cannot be used, from its header alone (None when it can)."""
    try:
        with _open(path) as img:
            size, image_format = img.size, img.format
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely ({exc})"
    except UnidentifiedImageError:
        return "unreadable (not a recognised image format)"
    except _DECODE_ERRORS as exc:
        return f"unreadable ({exc})"
    if reduction_for(size, image_format, max_pixels) is None:
        return _too_large(size, max_pixels)
    return None


def load_training_image(path: Path, *, max_pixels: int, target_size: int | None = None
                        ) -> Image.Image:
    """Decode the image file at `path` to RGB within `max_pixels` (see the module doc)."""
    data = path.read_bytes()
    try:
        with _open(io.BytesIO(data)) as img:
            size, image_format = img.size, img.format
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("unreadable (not a recognised image format)") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"unreadable ({exc})") from exc
    scale = reduction_for(size, image_format, max_pixels)
    if scale is None:
        raise ImageTooLargeError(_too_large(size, max_pixels))
    if scale == 1:
        return decode(data, max_pixels=max_pixels, target_size=target_size)
    return _decode_reduced(data, scale, max_pixels, target_size)


def _decode_reduced(data: bytes, scale: int, max_pixels: int, target_size: int | None
                    ) -> Image.Image:
    """A JPEG decoded at 1/scale (or smaller, down to what `target_size` still needs)."""
    try:
        img = _open(io.BytesIO(data))
        width, height = img.size
        if target_size:
            fits_target = [s for s in (1, *_SCALES) if s <= min(width, height) // target_size]
            scale = max([scale, *fits_target])
        img.draft(None, (width // scale, height // scale))
        if img.size[0] * img.size[1] > max_pixels:
            raise ImageTooLargeError(f"{_too_large((width, height), max_pixels)}; this JPEG "
                                     "cannot be decoded at a reduced scale")
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return img.convert("RGB")
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"too large to decode safely ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
