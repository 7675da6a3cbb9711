"""Image files to the crops the model sees, decoded as the server decodes uploads.

Each file goes through `models.preprocessing.EvalCrop` (what the server's decode processes
run: the same pixel budget, reduced JPEG decoding, resize and centre crop) within a time
budget, in DataLoader worker processes whose memory is capped (training.images). A file that
cannot be read or decoded, or that runs over a bound, becomes a `Failed` entry with the
reason instead of stopping the run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.decoding import ImageDecodeError, ImageTooLargeError
from models.preprocessing import crop_tensor
from models.process_limits import time_budget
from training.data.images import limit_worker_memory

logger = logging.getLogger(__name__)

Crop = Callable[[bytes, int], np.ndarray]  # EvalCrop: file bytes, pixel budget -> HWC uint8
MEMORY_REASON = ("decoding it needs more memory than a decoding process may use "
                 "(--decode-memory-mb)")


@dataclass(frozen=True)
class Failed:
    """A file that gave no crop, and why."""

    index: int
    reason: str


class Batch(NamedTuple):
    """The crops of a batch's decodable files, their indices, and the files that failed."""

    images: torch.Tensor  # uint8 NCHW (no rows when every file failed)
    indices: list[int]
    failed: list[Failed]


class CropDataset(Dataset):
    """Files -> (uint8 CHW crop, index), or `Failed`, each decode within `seconds`."""

    def __init__(self, paths: Sequence[Path], crop: Crop, *, max_pixels: int,
                 seconds: float) -> None:
        self.paths = list(paths)
        self.crop = crop
        self.max_pixels = max_pixels
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | Failed:
        path = self.paths[i]
        try:
            data = path.read_bytes()
            with time_budget(self.seconds, what=f"decoding {path.name}"):
                pixels = self.crop(data, self.max_pixels)
        except MemoryError:  # a worker's memory is capped (--decode-memory-mb)
            return Failed(i, MEMORY_REASON)
        except (ImageDecodeError, ImageTooLargeError) as exc:
            return Failed(i, str(exc))
        except OSError as exc:
            return Failed(i, f"cannot be read ({exc.strerror or exc})")
        return crop_tensor(pixels), i  # the HWC crop viewed as CHW, as the server has it


def collate(items: list[tuple[torch.Tensor, int] | Failed]) -> Batch:
    """Stack the crops; failed files are listed apart, in order."""
    failed = [item for item in items if isinstance(item, Failed)]
    good = [item for item in items if not isinstance(item, Failed)]
    images = (torch.stack([image for image, _ in good]) if good
              else torch.empty(0, dtype=torch.uint8))
    return Batch(images, [index for _, index in good], failed)


def crop_loader(dataset: CropDataset, *, batch_size: int, workers: int, memory_mb: int,
                pin_memory: bool) -> DataLoader:
    """Batches of `dataset` in order, decoded by `workers` processes (0: here), each with
    its memory capped at `memory_mb` over its footprint at start."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=pin_memory, collate_fn=collate,
        worker_init_fn=functools.partial(limit_worker_memory, memory_mb=memory_mb)
        if workers else None)


def is_worker_death(exc: BaseException) -> bool:
    """True for the error a DataLoader raises when one of its worker processes died (a
    crash in a decoder, or a kill from outside)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DataLoader worker" in text \
        and ("exited unexpectedly" in text or "killed by signal" in text)
