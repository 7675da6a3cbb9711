"""JPEGs for the device-decode tests: photo-like scenes, and broken or lying streams."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image


def jpeg_bytes(img: Image.Image, **kw: object) -> bytes:
    """The image as JPEG bytes (quality 90 unless given)."""
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=kw.pop("quality", 90), **kw)
    return buffer.getvalue()


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth shading, hard edges, fine texture, no symmetry."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / (7 + width / 40)) * np.cos(y / (11 + height / 50))
    g = 255 * x / width
    b = np.where((x - width * 0.3) ** 2 + (y - height * 0.6) ** 2 < (min(width, height) / 4) ** 2,
                 230.0, 40.0)
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    arr[: height // 3, : width // 5] = (250, 250, 20)  # a corner block: orientation shows
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def corrupt_scan(data: bytes) -> bytes:
    """A complete JPEG stream whose entropy-coded data holds bytes no decoder accepts."""
    start = data.index(b"\xff\xda") + 200
    return data[:start] + b"\xff\x67" * 50 + data[start + 100:]


def with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF header claiming `width` x `height` (the pixels unchanged)."""
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]
