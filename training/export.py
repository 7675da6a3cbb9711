"""Writing checkpoints: a trained model's card, and ImageNet classifiers from torchvision."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from models import checkpoint
from models.architectures import build, imagenet_categories, imagenet_weights
from models.checkpoint import ModelCard, Preprocessing

logger = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Library versions recorded in every card."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def weights_preprocessing(arch: str) -> Preprocessing:
    """The eval preprocessing torchvision publishes with `arch`'s ImageNet weights."""
    transforms = imagenet_weights(arch).transforms()
    return Preprocessing(resize=int(transforms.resize_size[0]), crop=int(transforms.crop_size[0]),
                         mean=tuple(transforms.mean), std=tuple(transforms.std),
                         interpolation=transforms.interpolation.value)


def write_checkpoint(directory: Path, model: nn.Module, *, name: str, arch: str, task: str,
                     classes: list[str], preprocessing: Preprocessing, stem: str,
                     thresholds: list[float] | None, metrics: dict[str, Any],
                     training: dict[str, Any],
                     reports: Mapping[str, Callable[[Path], None]] | None = None,
                     replaces: Collection[str] = ()) -> Path:
    """Build the card and save weights + card + `reports` as one unit (models.checkpoint)."""
    card = ModelCard(name=name, arch=arch, task=task, classes=classes,
                     preprocessing=preprocessing, thresholds=thresholds, metrics=metrics,
                     training={**training, "versions": versions()}, stem=stem)
    return checkpoint.save(directory, model, card, reports=reports, replaces=replaces)


def import_torchvision(arch: str, output: Path, *, name: str | None = None) -> Path:
    """Write torchvision's ImageNet classifier for `arch` as a checkpoint (1000 classes)."""
    weights = imagenet_weights(arch)
    model = build(arch, num_classes=1000, weights="imagenet")
    metrics = {k: v for k, v in weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).items()}
    return write_checkpoint(
        output, model, name=name or output.name, arch=arch, task="single_label",
        classes=imagenet_categories(arch), preprocessing=weights_preprocessing(arch),
        stem="imagenet", thresholds=None, metrics=metrics,
        training={"source": f"torchvision {weights}", "recipe": weights.meta.get("recipe")})
