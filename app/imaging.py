"""Decoding and resizing uploads on a bounded thread pool, off the event loop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.compute import name_native_thread
from app.exceptions import ImageTooLargeError, InvalidImageError
from models import preprocessing
from models.preprocessing import Transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    filename: str
    data: bytes


class ImageDecoder:
    """Turns uploads into uint8 CHW tensors with a model's eval transform, on worker threads."""

    def __init__(self, *, workers: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode",
                                        initializer=name_native_thread, initargs=("decode",))

    async def to_tensor(self, upload: Upload, transform: Transform, *,
                        target_size: int | None = None) -> torch.Tensor:
        """Decode and transform one upload; errors name the file."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._convert, upload, transform,
                                          target_size)

    async def to_tensors(self, uploads: list[Upload], transform: Transform, *,
                         target_size: int | None = None) -> list[torch.Tensor]:
        """Decode several uploads concurrently; the first bad file (in upload order) raises."""
        results = await asyncio.gather(
            *(self.to_tensor(u, transform, target_size=target_size) for u in uploads),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    def _convert(self, upload: Upload, transform: Transform,
                 target_size: int | None) -> torch.Tensor:
        try:
            image = preprocessing.decode(upload.data, max_pixels=self.max_pixels,
                                         target_size=target_size)
        except preprocessing.ImageTooLargeError as exc:
            raise ImageTooLargeError(upload.filename, str(exc)) from None
        except preprocessing.ImageDecodeError as exc:
            raise InvalidImageError(upload.filename, str(exc)) from None
        try:
            return transform(image)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InvalidImageError(upload.filename, f"cannot be transformed: {exc}") from None

    def close(self) -> None:
        """Stop the worker threads (pending work is cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
