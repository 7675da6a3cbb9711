"""Imbalanced classes in single-label training: class counts, loss weights, a balanced sampler
and the warning that suggests them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import WeightedRandomSampler

from training.exceptions import ConfigError

logger = logging.getLogger(__name__)

IMBALANCE_RATIO = 5.0  # largest / smallest class above this draws a warning


def class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Training images per class, from single-label class indices."""
    return torch.bincount(targets.long().reshape(-1), minlength=num_classes)


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency loss weights, normalised to mean 1 over the classes (a class without
    images is counted as one, so its weight stays finite)."""
    inverse = 1.0 / counts.double().clamp(min=1)
    return (inverse * len(counts) / inverse.sum()).float()


def check_balance(balance: str, task: str) -> None:
    """Refuse --balance where it cannot apply: multi-label data."""
    if balance not in ("none", "auto") and task != "single_label":
        raise ConfigError(f"--balance {balance} applies to single-label data only; this run is "
                          f"{task} (its loss already weighs each class's positives): "
                          "use --balance none")


def is_imbalanced(counts: torch.Tensor) -> bool:
    """True when the largest class has over IMBALANCE_RATIO x the images of the smallest."""
    return int(counts.max()) > IMBALANCE_RATIO * int(counts.min())


def resolve_balance(balance: str, counts: torch.Tensor | None, task: str) -> str:
    """What --balance means for this run: `auto` is `sampler` for imbalanced single-label
    data (it did best on real data made 10:1 imbalanced, docs/training-recipe.md) and
    `none` otherwise; the other values stand as given."""
    if balance != "auto":
        return balance
    if task != "single_label" or counts is None:
        return "none"
    return "sampler" if is_imbalanced(counts) else "none"


def warn_if_imbalanced(counts: torch.Tensor, classes: Sequence[str], *, balance: str,
                       chosen_by_default: bool = False) -> bool:
    """Log one warning when the largest class has over IMBALANCE_RATIO x the images of the
    smallest; True when it did."""
    largest, smallest = int(counts.argmax()), int(counts.argmin())
    big, small = int(counts[largest]), int(counts[smallest])
    if not is_imbalanced(counts):
        return False
    if balance == "none":
        advice = "consider --balance sampler or --balance loss"
    elif chosen_by_default:
        advice = (f"--balance auto draws every class equally often ({balance}); pass "
                  "--balance none to train on the natural frequencies")
    else:
        advice = f"--balance {balance} is on"
    logger.warning("imbalanced classes: %r has %d training images, %r only %d (%.1fx); "
                   "accuracy will favour the large classes, watch val_balanced_accuracy; %s",
                   classes[largest], big, classes[smallest], small,
                   big / max(small, 1), advice)
    return True


class BalancedSampler(WeightedRandomSampler):
    """Draws images with replacement so that every class is drawn equally often; one epoch
    draws as many images as the dataset holds, split across the ranks of a distributed run.

    Every rank draws the same sequence (seed + epoch) and keeps its own stride of it, so the
    ranks see disjoint draws and a resumed run draws what the interrupted one would have.
    """

    def __init__(self, targets: torch.Tensor, num_classes: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        counts = class_counts(targets, num_classes)
        per_image = 1.0 / counts.double().clamp(min=1)[targets.long()]
        self.per_rank = math.ceil(len(targets) / world_size)
        super().__init__(per_image, self.per_rank * world_size, replacement=True)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draw __iter__ yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples, replacement=True,
                                  generator=generator)
        return iter(drawn[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
