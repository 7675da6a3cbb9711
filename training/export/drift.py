"""The drift reference of a finished run: the validation images scored as the server will
score them, summarised into the card's `drift` field (models.drift).

The images go through the exported checkpoint's own Predictor (folded batch norms, the card's
temperature and unknown rule), not the training loop's outputs, so the reference holds
exactly the numbers the server compares its traffic with. It costs one inference pass over
the validation images, after the last epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from models import checkpoint
from models.device import Accelerator
from models.drift import reference
from models.predict import Predictor
from training.data.datasets import ImageDataset, make_loader
from training.storage import write_errors

logger = logging.getLogger(__name__)


def write_drift_reference(directory: Path, val: ImageDataset, *, accelerator: Accelerator,
                          batch_size: int, workers: int) -> None:
    """Score `val` with the checkpoint in `directory` and save it again with the reference
    in its card (nothing is written when no validation image can be scored)."""
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, accelerator)
    loader = make_loader(val, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=accelerator.is_cuda)
    outputs = [predictor.outputs(batch.images) for batch in loader if batch.images.shape[0]]
    if not outputs:
        logger.warning("no validation images could be scored: the checkpoint gets no drift "
                       "reference")
        return
    drift = reference(torch.cat(outputs), card)
    with write_errors(directory):
        checkpoint.save(directory, model, dataclasses.replace(card, drift=drift))
    logger.info("drift reference: %d validation images, %s", drift["images"],
                "with unknown scores" if drift["unknown_score"] else "no unknown rule")
