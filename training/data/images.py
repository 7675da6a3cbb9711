"""Decoding images for training and evaluation within a pixel budget.

An image is decoded exactly as the server decodes it (`models.decoding.decode`), except that
a JPEG over `max_pixels` (a 48 MP phone photo) is decoded at the 1/2, 1/4 or 1/8 scale that
fits the budget instead of refused; any other format over it cannot be reduced before
decoding and is refused, as is anything Pillow itself calls a decompression bomb.

What the checks cannot foresee is bounded by the process: each image has a time budget, and
DataLoader workers run under a memory cap (`limit_worker_memory`); an image over either is
skipped and counted like an undecodable one, and the run goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from models.decoding import ImageDecodeError, ImageTooLargeError, check_file, decode
from models.process_limits import limit_address_space, time_budget

logger = logging.getLogger(__name__)

DEFAULT_DECODE_SECONDS = 30.0  # per image; a budget, far above any real image's decode
DEFAULT_DECODE_MEMORY_MB = 1024  # per DataLoader worker, over its footprint at start


def skip_reason(path: Path, max_pixels: int) -> str | None:
    """Why the image at `path` cannot be used, from its headers alone (None when it can)."""
    try:
        check_file(path, max_pixels=max_pixels, shrink_to_fit=True)
    except ImageTooLargeError as exc:
        return f"{exc} (--max-pixels; only JPEGs can be decoded at a reduced scale)"
    except (ImageDecodeError, OSError) as exc:
        return f"unreadable ({exc})"
    return None


def load_training_image(path: Path, *, max_pixels: int, target_size: int | None = None,
                        seconds: float = DEFAULT_DECODE_SECONDS) -> Image.Image:
    """Decode the image file at `path` to RGB within `max_pixels` and `seconds` (see the
    module doc; DecodeTimeoutError, an ImageDecodeError, past the time)."""
    data = path.read_bytes()
    with time_budget(seconds, what=f"decoding {path.name}"):
        return decode(data, max_pixels=max_pixels, target_size=target_size,
                      shrink_to_fit=True)


def limit_worker_memory(worker_id: int, *, memory_mb: int) -> None:
    """DataLoader `worker_init_fn`: cap the worker's memory; an image that needs more fails
    with MemoryError in that worker and is skipped like an undecodable one."""
    cap = limit_address_space(memory_mb << 20)
    logger.debug("DataLoader worker %d: address space capped at %d MiB", worker_id, cap >> 20)
