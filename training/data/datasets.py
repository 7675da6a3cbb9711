"""Datasets and loaders: images decoded within bounds, transformed, collated into batches that
leave out (and name) the images that failed to decode."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from models.decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError
from training.data.discovery import Sample
from training.data.images import (
    DEFAULT_DECODE_MEMORY_MB,
    DEFAULT_DECODE_SECONDS,
    limit_worker_memory,
    load_training_image,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeFailure:
    """What the dataset returns for a sample whose image cannot be decoded."""

    index: int


class Batch(NamedTuple):
    """A collated batch of the decodable samples, and the dataset indices that failed."""

    images: torch.Tensor  # uint8 NCHW (zero rows when every image of the batch failed)
    targets: torch.Tensor
    indices: torch.Tensor
    failed: torch.Tensor


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int] | DecodeFailure]) -> Batch:
    """Stack the decoded samples; a failed one is left out (never replaced), its index kept."""
    failed = torch.tensor([it.index for it in items if isinstance(it, DecodeFailure)],
                          dtype=torch.long)
    good = [it for it in items if not isinstance(it, DecodeFailure)]
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return Batch(torch.empty(0, dtype=torch.uint8), empty, empty, failed)
    images, targets, indices = default_collate(good)
    return Batch(images, targets, indices, failed)


class ImageDataset(Dataset):
    """Decodes images, applies a transform, and returns (uint8 image, target, index).

    An image that fails to decode mid-run gives a `DecodeFailure` (logged once), which
    `collate` leaves out of the batch: the sample is skipped together with its label.
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], task: str,
                 transform: Callable[[Image.Image], torch.Tensor], *,
                 decode_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 decode_seconds: float = DEFAULT_DECODE_SECONDS) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.task = task
        self.transform = transform
        self.decode_size = decode_size
        self.max_pixels = max_pixels
        self.decode_seconds = decode_seconds
        self.index = {c: i for i, c in enumerate(self.classes)}
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, i: int) -> torch.Tensor:
        """The label tensor of sample i (class index, or a multi-hot float vector)."""
        labels = self.samples[i].labels
        if self.task == "single_label":
            return torch.tensor(self.index[labels[0]], dtype=torch.long)
        out = torch.zeros(len(self.classes))
        out[[self.index[c] for c in labels]] = 1.0
        return out

    def targets(self) -> torch.Tensor:
        """All targets stacked (for class weights and metrics)."""
        return torch.stack([self.target(i) for i in range(len(self))]) if self.samples \
            else torch.empty(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int] | DecodeFailure:
        path = self.samples[i].path
        try:
            image = load_training_image(path, max_pixels=self.max_pixels,
                                        target_size=self.decode_size,
                                        seconds=self.decode_seconds)
            pixels = self.transform(image)
        except MemoryError:  # a worker's memory is capped (--decode-memory-mb)
            return self._failed(i, path, "decoding it needs more memory than a DataLoader "
                                "worker may use (--decode-memory-mb)")
        except (ImageDecodeError, ImageTooLargeError, OSError) as exc:
            return self._failed(i, path, str(exc))
        return pixels, self.target(i), i

    def _failed(self, i: int, path: Path, reason: str) -> DecodeFailure:
        if i not in self._warned:
            self._warned.add(i)
            logger.warning("skipping image %s and its label: %s", path, reason)
        return DecodeFailure(i)


def make_loader(dataset: ImageDataset, *, batch_size: int, workers: int, shuffle: bool,
                pin_memory: bool, sampler: Sampler | None = None, seed: int = 0,
                drop_last: bool = False,
                worker_memory_mb: int | None = DEFAULT_DECODE_MEMORY_MB) -> DataLoader:
    """A DataLoader of `Batch`es, with persistent workers when there are any, each worker's
    memory capped at `worker_memory_mb` over its footprint at start (None: no cap)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        drop_last=drop_last, generator=generator, collate_fn=collate,
        worker_init_fn=None if worker_memory_mb is None
        else functools.partial(limit_worker_memory, memory_mb=worker_memory_mb))
