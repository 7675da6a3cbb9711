"""The data of one `fit`: discovered, split, wrapped in datasets and loaders, its class balance
and (with --normalize dataset) its mean and std measured, and the images that failed."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from models.card import Preprocessing
from models.preprocessing import eval_transform, train_transform
from training.data.balance import (
    BalancedSampler,
    check_balance,
    class_counts,
    resolve_balance,
    warn_if_imbalanced,
)
from training.data.datasets import ImageDataset, make_loader
from training.data.discovery import Sample, discover, sample_key
from training.data.split import classes_without, split_digest, split_samples
from training.distributed import DistInfo, gather_objects
from training.exceptions import DataError

if TYPE_CHECKING:
    from training.context import RunContext

logger = logging.getLogger(__name__)

SKIPPED_EXAMPLES = 20  # how many skipped images the card names
MIN_STD = 1.0 / 255.0  # --normalize dataset: a constant channel is divided by this, not 0


@dataclass
class DecodeFailures:
    """The dataset indices of the images that failed to decode during the run, per side."""

    train: set[int] = field(default_factory=set)
    val: set[int] = field(default_factory=set)


@dataclass
class TrainingData:
    """Training and validation datasets with their shared classes, task, preprocessing (the
    card's) and split record, and the images left out of them."""

    train: ImageDataset
    val: ImageDataset
    classes: list[str]
    task: str
    preprocessing: Preprocessing
    root: Path  # DATA as given: a folder or a CSV
    split: dict[str, Any] = field(default_factory=dict)  # sha256, sizes, where it came from
    unusable: list[tuple[Path, str]] = field(default_factory=list)  # skipped at discovery
    balance: str = "none"  # --balance as resolved for this data (training.data.balance)
    failed: DecodeFailures = field(default_factory=DecodeFailures)  # failed during the run

    def train_as_validated(self, samples: Sequence[Sample] | None = None) -> ImageDataset:
        """The training images (or `samples` of them) as validation sees them: the eval
        transform, no augmentation."""
        return ImageDataset(self.train.samples if samples is None else samples, self.classes,
                            self.task, self.val.transform, decode_size=self.val.decode_size,
                            max_pixels=self.val.max_pixels,
                            decode_seconds=self.val.decode_seconds)

    def add_train_failures(self, failed: set[int], *, epoch: int, info: DistInfo) -> None:
        """Record this epoch's undecodable training images (all ranks); refuse a run in
        which a class has no decodable training image left."""
        new = set().union(*gather_objects(info, failed)) - self.failed.train
        self.failed.train |= new
        if new:
            logger.warning("epoch %d: %d training images could not be decoded and were "
                           "skipped with their labels (%d in all)", epoch + 1, len(new),
                           len(self.failed.train))
        if not self.failed.train:
            return
        usable = [s for i, s in enumerate(self.train.samples) if i not in self.failed.train]
        if not usable:
            raise DataError(f"{self.root}: none of the {len(self.failed.train)} training "
                            "images could be decoded (see the warnings above)")
        unseen = classes_without(usable, self.classes)
        if unseen:
            total = sum(unseen[0] in s.labels for s in self.train.samples)
            raise DataError(f"{self.root}: class {unseen[0]!r} has no decodable training "
                            f"image (all {total} failed, see the warnings above); the model "
                            "would never see it")

    def add_val_failures(self, failed: list[int]) -> None:
        """Record the validation images that were excluded from the metrics."""
        new = set(failed) - self.failed.val
        self.failed.val |= new
        if new:
            logger.warning("%d validation images could not be decoded and are excluded from "
                           "the metrics (%d in all)", len(new), len(self.failed.val))

    def skipped_record(self) -> dict[str, Any]:
        """The card's account of images left out: unusable at discovery, failed to decode."""
        train = [self.train.samples[i].path for i in sorted(self.failed.train)]
        val = [self.val.samples[i].path for i in sorted(self.failed.val)]
        named = [*(p for p, _ in self.unusable), *train, *val]
        base = self.root if self.root.is_dir() else self.root.parent
        return {"unusable": len(self.unusable), "train_undecodable": len(train),
                "val_undecodable": len(val),
                "examples": [sample_key(p, base) for p in named[:SKIPPED_EXAMPLES]]}


class Loaders(NamedTuple):
    """The training sampler (its epoch is set each epoch) and both loaders."""

    train_sampler: DistributedSampler | BalancedSampler
    train: DataLoader
    val: DataLoader


def make_preprocessing(run: RunContext) -> Preprocessing:
    """The eval preprocessing written to the card (and used for validation): from one of
    our checkpoints, with its mean, std and interpolation."""
    if run.parent is not None:
        return run.parent.preprocessing(run.cfg.image_size,
                                        resize_ratio=run.recipe.eval_resize_ratio)
    return Preprocessing.for_crop(run.cfg.image_size, ratio=run.recipe.eval_resize_ratio)


def load_data(run: RunContext) -> TrainingData:
    """Discover, split (or read --val), wrap both sides in datasets with their transforms,
    resolve --balance, and measure the mean and std with --normalize dataset."""
    cfg, recipe, info = run.cfg, run.recipe, run.info
    preprocessing = make_preprocessing(run)
    found = discover(cfg.data, task=cfg.task, max_pixels=cfg.max_pixels)
    check_balance(cfg.balance, found.task)
    train_samples, val_samples, val_root, source = split_samples(cfg, found, info)
    if len(train_samples) < 2:
        raise DataError(f"{cfg.data}: need at least 2 training images, found {len(train_samples)}")
    for name in classes_without(val_samples, found.classes):
        logger.warning("class %r has no validation image (too few images to split off one); "
                       "its validation figures are empty: add images or pass --val", name)
    augment = train_transform(preprocessing, min_scale=recipe.min_scale, hflip=recipe.hflip,
                              trivial_augment=recipe.trivial_augment > 0,
                              augment_probability=recipe.trivial_augment,
                              pad_crop=recipe.pad_crop)
    train = ImageDataset(train_samples, found.classes, found.task, augment,
                         decode_size=preprocessing.resize, max_pixels=cfg.max_pixels,
                         decode_seconds=cfg.decode_seconds)
    val = ImageDataset(val_samples, found.classes, found.task, eval_transform(preprocessing),
                       decode_size=preprocessing.resize, max_pixels=cfg.max_pixels,
                       decode_seconds=cfg.decode_seconds)
    logger.info("data: %d training / %d validation images, %d classes, %s",
                len(train), len(val), len(found.classes), found.task)
    counts = (class_counts(train.targets(), len(found.classes))
              if found.task == "single_label" else None)
    balance = resolve_balance(cfg.balance, counts, found.task)
    if counts is not None and info.is_main:
        warn_if_imbalanced(counts, found.classes, balance=balance,
                           chosen_by_default=cfg.balance == "auto")
    split = {"sha256": split_digest(train_samples, found.root, val_samples, val_root),
             "train": len(train), "val": len(val), "source": source}
    data = TrainingData(train, val, found.classes, found.task, preprocessing, cfg.data, split,
                        found.skipped, balance)
    if recipe.normalize == "dataset":
        mean, std = measure_mean_std(data, info, batch_size=2 * recipe.batch_size,
                                     workers=cfg.workers)
        data.preprocessing = dataclasses.replace(preprocessing, mean=mean, std=std)
    return data


def train_sampler_for(run: RunContext, data: TrainingData
                      ) -> DistributedSampler | BalancedSampler:
    """This rank's training sampler: a shuffle, or class-balanced draws with --balance sampler."""
    info, seed = run.info, run.cfg.seed
    if data.balance == "sampler":
        return BalancedSampler(data.train.targets(), len(data.classes), seed=seed,
                               rank=info.rank, world_size=info.world_size)
    return DistributedSampler(data.train, num_replicas=info.world_size, rank=info.rank,
                              shuffle=True, seed=seed)


def make_loaders(run: RunContext, data: TrainingData) -> Loaders:
    """This rank's share of both sides; validation runs at twice the batch size."""
    cfg, info, batch_size = run.cfg, run.info, run.recipe.batch_size
    pin_memory = run.accelerator.is_cuda
    # The sampler's seed is shared (one permutation split across ranks); the loader's is
    # per rank, so each rank's workers draw their own augmentation stream.
    train_sampler = train_sampler_for(run, data)
    # A last batch of one image is dropped: BatchNorm in training mode fails on it where the
    # features shrink to 1x1. Each rank holds the same count, so all ranks drop it together.
    drop_last = len(train_sampler) % batch_size == 1
    train = make_loader(data.train, batch_size=batch_size, workers=cfg.workers, shuffle=False,
                        pin_memory=pin_memory, sampler=train_sampler, seed=cfg.seed + info.rank,
                        drop_last=drop_last, worker_memory_mb=cfg.decode_memory_mb)
    val_sampler = (DistributedSampler(data.val, num_replicas=info.world_size, rank=info.rank,
                                      shuffle=False)
                   if info.enabled else None)
    val = make_loader(data.val, batch_size=batch_size * 2, workers=cfg.workers, shuffle=False,
                      pin_memory=pin_memory, sampler=val_sampler,
                      worker_memory_mb=cfg.decode_memory_mb)
    return Loaders(train_sampler, train, val)


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
    """The training images' per-channel mean and std, as the eval transform shows them
    (He et al. normalise CIFAR so; each rank measures its share)."""
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
