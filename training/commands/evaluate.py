"""`evaluate`: a checkpoint on a labelled folder/CSV, through the card's own eval transform."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from models.calibration import ECE_BINS, expected_calibration_error
from models.decoding import DEFAULT_MAX_PIXELS
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import eval_transform
from models.unknown import auroc
from training.config import EvaluateConfig
from training.data.datasets import ImageDataset, make_loader
from training.data.discovery import discover, unlabelled_samples
from training.exceptions import DataError
from training.loop.metrics import multi_label_metrics, single_label_metrics

logger = logging.getLogger(__name__)


def build_eval_dataset(data: Path, card: checkpoint.ModelCard, *,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageDataset:
    """The labelled images at `data`, mapped to the card's classes, with the card's transform."""
    return _eval_data(data, card, max_pixels)[0]


def _eval_data(data: Path, card: checkpoint.ModelCard, max_pixels: int
               ) -> tuple[ImageDataset, list[Path]]:
    """The dataset and the images discovery left out (unreadable headers, too large)."""
    found = discover(data, task=card.task, classes=card.classes, max_pixels=max_pixels)
    dataset = ImageDataset(found.samples, card.classes, card.task,
                           eval_transform(card.preprocessing),
                           decode_size=card.preprocessing.resize, max_pixels=max_pixels)
    return dataset, [path for path, _ in found.skipped]


def score_dataset(predictor: Predictor, dataset: ImageDataset, *, batch_size: int,
                  workers: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The model's outputs (Predictor.outputs: logits, then the unknown score where the card
    has the rule) and targets for every decodable image, in dataset order, and the indices
    of the images that could not be decoded (left out)."""
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, shuffle=False,
                         pin_memory=predictor.accelerator.is_cuda)
    outputs, targets, failed = [], [], []
    for batch in loader:
        failed.extend(batch.failed.tolist())
        if batch.images.shape[0]:
            outputs.append(predictor.outputs(batch.images).numpy())
            targets.append(batch.targets.numpy())
    if not outputs:
        raise DataError(f"none of the {len(failed)} images could be decoded "
                        "(see the warnings above)")
    return np.concatenate(outputs), np.concatenate(targets), failed


def unknown_report(predictor: Predictor, known_outputs: np.ndarray, other: Path | None, *,
                   cfg: EvaluateConfig) -> dict[str, Any] | None:
    """The card's unknown-input rule on DATA (share accepted) and on `other` (share rejected,
    AUROC of the score); None for a card without the rule."""
    card = predictor.card
    if card.unknown is None:
        if other is not None:
            raise DataError(f"--unknown: the checkpoint {card.name} has no unknown-input rule "
                            "(its card was written without one); retrain it with this version")
        return None
    threshold = card.unknown_threshold
    known = predictor.unknown_scores(torch.as_tensor(known_outputs)).numpy()
    out: dict[str, Any] = {"method": card.unknown["method"], "threshold": threshold,
                           "images": int(len(known)),
                           "accepted": float(np.mean(known <= threshold))}
    if other is not None:
        dataset = ImageDataset(unlabelled_samples(other, max_pixels=cfg.max_pixels),
                               card.classes, "multi_label", eval_transform(card.preprocessing),
                               decode_size=card.preprocessing.resize, max_pixels=cfg.max_pixels)
        outputs, _, _ = score_dataset(predictor, dataset, batch_size=cfg.batch_size,
                                      workers=cfg.workers)
        scores = predictor.unknown_scores(torch.as_tensor(outputs)).numpy()
        out.update({"other": str(other), "other_images": int(len(scores)),
                    "rejected": float(np.mean(scores > threshold)),
                    "auroc": auroc(known, scores)})
    return out


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict[str, Any]:
    """Metrics of the checkpoint at cfg.checkpoint on the labelled data at cfg.data (the
    confusion matrix only with cfg.confusion_matrix).

    Images that cannot be used (unreadable, too large, failing to decode) are excluded from
    the metrics and listed under `excluded_images`.
    """
    accelerator = Accelerator.create(cfg.device, "auto" if cfg.amp else "fp32")
    checkpoint.verify_weights(cfg.checkpoint)
    model, card = checkpoint.load(cfg.checkpoint)
    predictor = Predictor(model, card, accelerator)
    dataset, unusable = _eval_data(cfg.data, card, cfg.max_pixels)
    logger.info("evaluating %s on %d images from %s", card.name, len(dataset), cfg.data)
    with torch.inference_mode():
        outputs, targets, failed = score_dataset(predictor, dataset, batch_size=cfg.batch_size,
                                                 workers=cfg.workers)
        scores = predictor.scores(torch.as_tensor(outputs)).numpy()
        unknown = unknown_report(predictor, outputs, cfg.unknown, cfg=cfg)
    if card.task == "single_label":
        metrics = single_label_metrics(scores, targets.astype(int), card.classes)
        if not cfg.confusion_matrix:
            del metrics["confusion_matrix"]
    else:
        thresholds = card.thresholds or [0.5] * card.num_classes
        metrics = multi_label_metrics(scores, targets, card.classes, thresholds)
    labels = targets.astype(int) if card.task == "single_label" else targets
    # how well the scores as served (with the card's temperature) match the outcomes here
    metrics["ece"] = (expected_calibration_error(scores, labels, card.task, bins=ECE_BINS)
                      if len(scores) else None)
    excluded = [str(p) for p in unusable] + [str(dataset.samples[i].path) for i in sorted(failed)]
    if excluded:
        logger.warning("%d images are excluded from the metrics (named above)", len(excluded))
    if unknown is not None:
        metrics["unknown"] = unknown
    return {"model": card.name, "task": card.task, "data": str(cfg.data), **metrics,
            "excluded": len(excluded), "excluded_images": excluded}
