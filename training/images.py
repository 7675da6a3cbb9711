"""Decoding images for training and evaluation within a pixel budget.

An image is decoded exactly as the server decodes it (`models.decoding.decode`), except that
a JPEG over `max_pixels` (a 48 MP phone photo) is decoded at the 1/2, 1/4 or 1/8 scale that
fits the budget instead of refused; any other format over it cannot be reduced before
decoding and is refused, as is anything Pillow itself calls a decompression bomb.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from models.decoding import ImageDecodeError, ImageTooLargeError, check_file, decode


def skip_reason(path: Path, max_pixels: int) -> str | None:
    """Why the image at `path` cannot be used, from its headers alone (None when it can)."""
    try:
        check_file(path, max_pixels=max_pixels, shrink_to_fit=True)
    except ImageTooLargeError as exc:
        return f"{exc} (--max-pixels; only JPEGs can be decoded at a reduced scale)"
    except (ImageDecodeError, OSError) as exc:
        return f"unreadable ({exc})"
    return None


def load_training_image(path: Path, *, max_pixels: int, target_size: int | None = None
                        ) -> Image.Image:
    """Decode the image file at `path` to RGB within `max_pixels` (see the module doc)."""
    return decode(path.read_bytes(), max_pixels=max_pixels, target_size=target_size,
                  shrink_to_fit=True)
