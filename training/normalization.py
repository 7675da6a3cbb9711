"""Input normalisation measured on the training images (`--normalize dataset`).

He et al. normalise CIFAR by the training set's own per-channel mean and standard deviation;
one pass over the training images through the eval transform (no augmentation) measures them,
each rank over its share, and they go into the card's preprocessing like ImageNet's would.
"""

from __future__ import annotations

import logging

import torch

from training.data import ImageDataset, make_loader
from training.distributed import DistInfo, gather_objects
from training.exceptions import DataError
from training.fit_data import TrainingData

logger = logging.getLogger(__name__)

MIN_STD = 1.0 / 255.0  # a channel that never varies is divided by this, not by 0


def channel_sums(dataset: ImageDataset, *, batch_size: int, workers: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares of the pixels (scaled to 0..1), and the pixel count."""
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=False)
    total, squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(
        3, dtype=torch.float64), 0
    for batch in loader:
        if not batch.images.shape[0]:
            continue
        x = batch.images.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    return total, squares, count


def measure_mean_std(data: TrainingData, info: DistInfo, *, batch_size: int, workers: int
                     ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The training images' per-channel mean and std, as the eval transform shows them."""
    share = data.train_as_validated(data.train.samples[info.rank::info.world_size])
    parts = gather_objects(info, channel_sums(share, batch_size=batch_size, workers=workers))
    total = sum(p[0] for p in parts)
    squares = sum(p[1] for p in parts)
    count = sum(p[2] for p in parts)
    if count == 0:
        raise DataError("--normalize dataset: none of the training images could be decoded")
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt().clamp(min=MIN_STD)
    mean_t = tuple(round(float(v), 6) for v in mean)
    std_t = tuple(round(float(v), 6) for v in std)
    logger.info("normalisation measured on %d training images: mean %s, std %s",
                len(data.train), mean_t, std_t)
    return mean_t, std_t  # type: ignore[return-value]
