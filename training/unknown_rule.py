"""The unknown-input rule of a finished run: class means of the training images' features,
and the threshold that accepts ACCEPTANCE of the validation images (models.unknown)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.architectures import arch_spec
from models.device import Accelerator
from models.unknown import WithFeatures, class_means, cosine_distance, unknown_record
from training.data.datasets import ImageDataset, make_loader
from training.data.load import TrainingData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnknownRule:
    """What a checkpoint stores: the card's `unknown` record and the [C, D] class means."""

    record: dict[str, Any]
    class_means: torch.Tensor


@torch.inference_mode()
def pooled_features(model: nn.Module, arch: str, dataset: ImageDataset, *,
                    accelerator: Accelerator, normalize: nn.Module, batch_size: int,
                    workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] pooled features (the head's input) and targets of every decodable image."""
    split = WithFeatures(model, arch_spec(arch).classifier).eval()
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=accelerator.is_cuda)
    features, targets = [], []
    for batch in loader:
        if not batch.images.shape[0]:
            continue
        with accelerator.autocast():
            _, pooled = split(normalize(accelerator.to_device(batch.images)))
        features.append(pooled.float().cpu())
        targets.append(batch.targets)
    if not features:
        return torch.empty(0), torch.empty(0)
    return torch.cat(features), torch.cat(targets)


def fit_unknown_rule(model: nn.Module, arch: str, data: TrainingData, *,
                     accelerator: Accelerator, normalize: nn.Module, batch_size: int,
                     workers: int) -> UnknownRule | None:
    """The rule for `model` on this run's data: means over the training images seen through
    the eval transform (no augmentation), threshold over the validation images. None when
    there are no validation images to set it on."""
    was_training = model.training
    model.eval()
    try:
        train = data.train_as_validated()
        common = {"accelerator": accelerator, "normalize": normalize,
                  "batch_size": batch_size, "workers": workers}
        train_features, train_targets = pooled_features(model, arch, train, **common)
        val_features, _ = pooled_features(model, arch, data.val, **common)
    finally:
        model.train(was_training)
    if not len(val_features) or not len(train_features):
        logger.warning("no validation images: the checkpoint gets no unknown-input rule")
        return None
    means = class_means(train_features, train_targets, len(data.classes))
    scores = cosine_distance(val_features, means).numpy()
    record = unknown_record(scores)
    logger.info("unknown-input rule: cosine distance > %.4f is unknown (accepts %.1f%% of %d "
                "validation images; median %.4f)", record["threshold"],
                100 * record["val_accepted"], record["val_images"], float(np.median(scores)))
    return UnknownRule(record, means)
