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

from models.image_formats import (
    OPENERS,
    PILLOW_FORMATS,
    REDUCED_SCALE_FORMATS,
    accepted_text,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far from a bomb


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (a decompression bomb or simply too big)."""


# What may be read: the formats whose real frame size is known before any pixel is decoded
# (models.image_formats; ICO through `_ico_frame_size`). Pillow's others are refused.
ACCEPTED_FORMATS = PILLOW_FORMATS
_OPENERS = OPENERS  # what Image.open is allowed to try (MPO is opened by JPEG's)
_DRAFT_FORMATS = REDUCED_SCALE_FORMATS  # may be decoded at a reduced scale
_REDUCED_SCALES = (2, 4, 8)  # the scales libjpeg decodes at
# libjpeg decodes a progressive JPEG scan by scan over a full-size coefficient buffer, each
# scan a pass over the whole frame; encoders write about 10 (libjpeg's script) to 20. A file of
# thousands of tiny scans costs minutes of CPU, so more than this is refused unread.
MAX_JPEG_SCANS = 100
# and each scan is a pass over the frame: scans x pixels may be at most this many passes over
# a frame of the whole pixel budget (a 12 MP photo of 10 scans is 0.3% of it at 40 MP)
MAX_PROGRESSIVE_PASSES = 32
_START_OF_SCAN = b"\xff\xda"
_TIFF_TILE_TAGS = (322, 323)  # TileWidth, TileLength
_TIFF_ROWS_PER_STRIP = 278
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
        img = Image.open(source, formats=_OPENERS)
    width, height = img.size
    if img.format in _DRAFT_FORMATS and img.info.get("progressive"):
        _check_progressive(img.size, whole(), max_pixels)
    elif img.format == "TIFF":
        _check_tiff_blocks(img, max_pixels)
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


def _check_progressive(size: tuple[int, int], data: bytes, max_pixels: int) -> None:
    """A progressive JPEG is decoded over its full frame whatever the draft scale, so the
    full frame must fit the budget, and its scans are counted."""
    _check_pixels(size, max_pixels)
    scans = jpeg_scan_count(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageTooLargeError(f"progressive JPEG with {scans:,} scans, over the limit of "
                                 f"{MAX_JPEG_SCANS}")
    if scans * size[0] * size[1] > MAX_PROGRESSIVE_PASSES * max_pixels:
        raise ImageTooLargeError(
            f"progressive JPEG of {size[0]}x{size[1]} pixels in {scans} scans: decoding it "
            f"would pass over more than {MAX_PROGRESSIVE_PASSES} x the pixel limit of "
            f"{max_pixels:,}")


def jpeg_scan_count(data: bytes) -> int:
    """The number of scans (SOS markers) in the first image of a JPEG stream.

    Counting the marker's two bytes anywhere is exact for the entropy-coded data (a 0xFF
    there is always followed by a stuffed zero) and only over-counts bytes inside metadata
    segments; the segments are walked only when that quick count is over the limit.
    """
    if data.count(_START_OF_SCAN) <= MAX_JPEG_SCANS:
        return data.count(_START_OF_SCAN)
    scans, pos = 0, 2  # after SOI
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: the end of the first image (an MPO's others follow)
            break
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01):
            pos += 1 if marker == 0xFF else 2  # fill byte, restart, stuffed byte, TEM
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:
            scans += 1
            pos = _end_of_entropy_data(data, pos)
    return scans


def _end_of_entropy_data(data: bytes, pos: int) -> int:
    """The position of the first marker after a scan's entropy-coded data."""
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 1 < len(data):
        follower = data[pos + 1]
        if follower != 0x00 and not 0xD0 <= follower <= 0xD7 and follower != 0xFF:
            return pos
        pos += 1 if follower == 0xFF else 2
    return len(data)


def _check_tiff_blocks(img: Image.Image, max_pixels: int) -> None:
    """libtiff inflates a whole tile (or strip) before cropping it to the image: a tiny TIFF
    may declare one tile far larger than itself, so its blocks count against the budget."""
    tags = getattr(img, "tag_v2", {})
    width, height = img.size
    tile_width, tile_length = (tags.get(tag) for tag in _TIFF_TILE_TAGS)
    if tile_width is not None or tile_length is not None:
        block = (_tag_int(tile_width, width), _tag_int(tile_length, height))
        kind = "tile"
    else:
        rows = _tag_int(tags.get(_TIFF_ROWS_PER_STRIP), height)
        block, kind = (width, min(rows, max(height, 1))), "strip"
    if block[0] * block[1] > max_pixels:
        raise ImageTooLargeError(
            f"TIFF {kind} of {block[0]}x{block[1]} = {block[0] * block[1]:,} pixels, over the "
            f"limit of {max_pixels:,}")


def _tag_int(value: object, default: int) -> int:
    if isinstance(value, tuple):
        value = value[0] if value else None
    try:
        return int(value) if value is not None else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ImageDecodeError(f"TIFF tag value {value!r} is not an integer") from None


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
                               f"{accepted_text()})") from exc
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
        # over white: the same pixels as alpha_composite on a white RGBA background, in
        # 11 bytes per pixel instead of 15 (no RGBA background, no RGBA result)
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
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
