"""`evaluate`: a checkpoint on a labelled folder/CSV, through the card's own eval transform."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from models.device import Runtime
from models.predict import Predictor
from models.preprocessing import eval_transform
from training.data import ImageDataset, discover, make_loader
from training.metrics import multi_label_metrics, single_label_metrics

logger = logging.getLogger(__name__)


def build_eval_dataset(data: Path, card: checkpoint.ModelCard) -> ImageDataset:
    """The labelled images at `data`, mapped to the card's classes, with the card's transform."""
    found = discover(data, task=card.task, classes=card.classes)
    return ImageDataset(found.samples, card.classes, card.task,
                        eval_transform(card.preprocessing), decode_size=card.preprocessing.resize)


def score_dataset(predictor: Predictor, dataset: ImageDataset, *, batch_size: int,
                  workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets for every image, in dataset order."""
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=predictor.runtime.is_cuda)
    scores, targets = [], []
    for images, y, _ in loader:
        scores.append(predictor.probabilities(images).numpy())
        targets.append(y.numpy())
    return np.concatenate(scores), np.concatenate(targets)


def evaluate_checkpoint(directory: Path, data: Path, *, device: str = "auto",
                        batch_size: int = 64, workers: int = 0, amp: bool = True
                        ) -> dict[str, Any]:
    """Metrics of the checkpoint at `directory` on the labelled data at `data`."""
    runtime = Runtime.create(device, "auto" if amp else "fp32")
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, runtime)
    dataset = build_eval_dataset(data, card)
    logger.info("evaluating %s on %d images from %s", card.name, len(dataset), data)
    with torch.inference_mode():
        scores, targets = score_dataset(predictor, dataset, batch_size=batch_size,
                                        workers=workers)
    if card.task == "single_label":
        metrics = single_label_metrics(scores, targets.astype(int), card.classes)
    else:
        thresholds = card.thresholds or [0.5] * card.num_classes
        metrics = multi_label_metrics(scores, targets, card.classes, thresholds)
    return {"model": card.name, "task": card.task, "data": str(data), **metrics}
