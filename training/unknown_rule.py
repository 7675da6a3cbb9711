"""The unknown-input rule of a finished run (models.unknown): the stage Gaussians of the
training images' features, standardised and thresholded on the validation images so that
`acceptance` of them are accepted."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.architectures import arch_spec
from models.device import Accelerator
from models.unknown import ACCEPTANCE, METHOD, expected_flagging, unknown_record
from models.unknown_stages import StagedNetwork, StageMahalanobis, fit_state
from training.data.datasets import ImageDataset, make_loader
from training.data.load import TrainingData

logger = logging.getLogger(__name__)

FEW_VALIDATION_IMAGES = 100  # below this the threshold's acceptance is noticeably noisy


@dataclass(frozen=True)
class UnknownRule:
    """What a checkpoint stores: the card's `unknown` record and the rule's tensors."""

    record: dict[str, Any]
    state: dict[str, torch.Tensor]


def stage_features(model: nn.Module, arch: str, dataset: ImageDataset, *,
                   accelerator: Accelerator, normalize: nn.Module, batch_size: int,
                   workers: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Per batch of decodable images: each stage's [N, D_s] pooled features (CPU, float32)
    and the images' targets, from one forward pass in eval mode."""
    staged = StagedNetwork(model, arch_spec(arch).classifier).eval()
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=accelerator.is_cuda)
    for batch in loader:
        if not batch.images.shape[0]:
            continue
        with torch.inference_mode(), accelerator.autocast():
            _, pooled = staged(normalize(accelerator.to_device(batch.images)))
            pooled = [p.float().cpu() for p in pooled]
        yield [p.clone() for p in pooled], batch.targets


def fit_unknown_rule(model: nn.Module, arch: str, data: TrainingData, *,
                     accelerator: Accelerator, normalize: nn.Module, batch_size: int,
                     workers: int, acceptance: float = ACCEPTANCE) -> UnknownRule | None:
    """The rule for `model` on this run's data: the stage Gaussians over the training images
    seen through the eval transform (no augmentation), standardisation and threshold over
    the validation images. None when there are too few images to set it on."""
    common = {"accelerator": accelerator, "normalize": normalize, "batch_size": batch_size,
              "workers": workers}
    was_training = model.training
    model.eval()
    try:
        val_batches = list(stage_features(model, arch, data.val, **common))
        if sum(len(targets) for _, targets in val_batches) < 2:
            logger.warning("fewer than two validation images: the checkpoint gets no "
                           "unknown-input rule")
            return None
        val = [torch.cat(stage) for stage in zip(*(p for p, _ in val_batches), strict=True)]
        train = stage_features(model, arch, data.train_as_validated(), **common)
        try:
            state = fit_state(train, val, len(data.classes))
        except ValueError as exc:
            logger.warning("no unknown-input rule: %s", exc)
            return None
    finally:
        model.train(was_training)
    with torch.no_grad():
        scores = StageMahalanobis(state)(val).numpy()
    record = {**unknown_record(scores, acceptance, method=METHOD), "stages": len(val),
              **expected_flagging(acceptance)}
    logger.info("unknown-input rule: stage Mahalanobis score > %.3f is unknown (accepts %.1f%% "
                "of %d validation images; median %.3f)", record["threshold"],
                100 * record["val_accepted"], record["val_images"], float(np.median(scores)))
    if len(scores) < FEW_VALIDATION_IMAGES:
        spread = 2 * math.sqrt(acceptance * (1 - acceptance) / len(scores))
        logger.warning("the unknown-input threshold rests on %d validation images: the share of "
                       "images like them that it accepts may be %.0f%% +- %.0f%%; hold out more "
                       "for a steadier rule", len(scores), 100 * acceptance, 100 * spread)
    return UnknownRule(record, state)
