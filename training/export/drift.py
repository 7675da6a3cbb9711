"""The drift reference of a finished run: the validation images scored as the server will
score them, summarised into the card's `drift` field (models.drift).

The images go through the exported checkpoint's own Predictor (folded batch norms, the card's
temperature and unknown rule), not the training loop's outputs, so the reference holds
exactly the numbers the server compares its traffic with. It costs one inference pass over
the validation images, after the last epoch, before the final export writes the card.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from models.card import ModelCard
from models.device import Accelerator
from models.drift import reference
from models.predict import Predictor
from training.data.datasets import ImageDataset, make_loader

logger = logging.getLogger(__name__)


def drift_reference(model: nn.Module, card: ModelCard, val: ImageDataset, *,
                    accelerator: Accelerator, batch_size: int, workers: int
                    ) -> dict[str, Any] | None:
    """The card's `drift` field: `val` scored by the Predictor of `model` (as the checkpoint
    loads it) under `card`; None when no validation image can be scored."""
    predictor = Predictor(model, card, accelerator)
    loader = make_loader(val, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=accelerator.is_cuda)
    outputs = [predictor.outputs(batch.images) for batch in loader if batch.images.shape[0]]
    if not outputs:
        logger.warning("no validation images could be scored: the checkpoint gets no drift "
                       "reference")
        return None
    drift = reference(torch.cat(outputs), card)
    logger.info("drift reference: %d validation images, %s", drift["images"],
                "with unknown scores" if drift["unknown_score"] else "no unknown rule")
    return drift
