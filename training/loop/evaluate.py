"""Evaluation: the validation pass over all ranks, temperature-scaled, and its metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.calibration import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from models.device import Accelerator
from models.outputs import probabilities
from training.distributed import gather_objects
from training.exceptions import DataError
from training.loop.metrics import held_out_multi_label_metrics, single_label_metrics

if TYPE_CHECKING:
    from training.context import RunContext
    from training.data.load import TrainingData
    from training.loop.train import Learner

logger = logging.getLogger(__name__)

CARD_FIELDS = ("temperature", "ece_before", "ece_after", "bins")


@dataclass
class EvalOutput:
    """Validation scores and targets of every sample once, in dataset order, plus the loss."""

    scores: np.ndarray
    targets: np.ndarray
    loss: float
    failed: list[int] = field(default_factory=list)  # dataset indices excluded (not decodable)
    logits: np.ndarray | None = None  # the raw outputs the scores came from, same order



@torch.inference_mode()
def predict_scores(model: nn.Module, loader: DataLoader, *, accelerator: Accelerator,
                   normalize: nn.Module, task: str,
                   on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, list[int]]:
    """Scores, targets, dataset indices and raw logits for this rank's share of `loader`,
    and the indices of the images that could not be decoded (left out of the rest)."""
    model.eval()
    scores, targets, indices, logits_all, failed = [], [], [], [], []
    for batch in loader:
        failed.extend(batch.failed.tolist())
        if batch.images.shape[0] == 0:
            continue
        x = normalize(accelerator.to_device(batch.images))
        with accelerator.autocast():
            logits = model(x).float().cpu()
        scores.append(probabilities(logits, task).numpy())
        targets.append(batch.targets.numpy())
        indices.append(batch.indices.numpy())
        logits_all.append(logits)
        if on_batch is not None:
            on_batch(batch.images, logits)
    if not scores:
        return np.empty((0,)), np.empty((0,)), np.empty((0,), int), torch.empty(0), failed
    return (np.concatenate(scores), np.concatenate(targets), np.concatenate(indices),
            torch.cat(logits_all), failed)


def evaluate(run: RunContext, learner: Learner, loader: DataLoader, *, task: str
             ) -> EvalOutput:
    """Validation over all ranks: gathered, de-duplicated (sampler padding dropped), ordered.

    Images that fail to decode are excluded and listed in `failed`; none decoding is an error.
    """
    accelerator = run.accelerator
    scores, targets, indices, logits, failed = predict_scores(
        learner.model, loader, accelerator=accelerator, normalize=learner.normalize, task=task)
    parts = gather_objects(run.info, (scores, targets, indices, logits, failed))
    merged: dict[int, tuple[np.ndarray, np.ndarray, torch.Tensor]] = {}
    all_failed: set[int] = set()
    for rank_scores, rank_targets, rank_indices, rank_logits, rank_failed in parts:
        all_failed.update(rank_failed)
        for row, i in enumerate(rank_indices.tolist()):  # padding repeats an index: keep one
            merged.setdefault(i, (rank_scores[row], rank_targets[row], rank_logits[row]))
    if not merged:
        raise DataError(f"none of the {len(all_failed)} validation images could be decoded "
                        "(see the warnings above)")
    order = sorted(merged)
    all_scores = np.stack([merged[i][0] for i in order])
    all_targets = np.stack([merged[i][1] for i in order])
    all_logits = torch.stack([merged[i][2] for i in order])
    target_t = torch.as_tensor(all_targets)
    with torch.no_grad():
        loss = float(learner.criterion.cpu()(all_logits, target_t))
    learner.criterion.to(accelerator.device)
    return EvalOutput(scores=all_scores, targets=all_targets, loss=loss,
                      failed=sorted(all_failed), logits=all_logits.numpy())


@dataclass
class CalibratedOutput(EvalOutput):
    """A validation pass whose `scores` are the calibrated probabilities (what the checkpoint
    will serve); `calibration` holds the temperature, ECE before/after and diagram data."""

    calibration: dict[str, Any] = field(default_factory=dict)


def calibrate(validation: EvalOutput, task: str, *, bins: int = ECE_BINS) -> CalibratedOutput:
    """Fit the temperature on `validation.logits` and rescore with it."""
    if validation.logits is None:
        raise ValueError("calibration needs the validation logits")
    targets = validation.targets.astype(int) if task == "single_label" else validation.targets
    temperature = fit_temperature(validation.logits, targets, task)
    logits = torch.as_tensor(validation.logits, dtype=torch.float32)
    before = probabilities(logits, task).numpy()
    after = probabilities(logits, task, temperature).numpy()
    record = {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, targets, task, bins=bins),
        "ece_after": expected_calibration_error(after, targets, task, bins=bins),
        "bins": bins,
        "reliability_before": reliability(before, targets, task, bins=bins),
        "reliability_after": reliability(after, targets, task, bins=bins),
    }
    logger.info("calibration: temperature %s, ECE %.4f -> %.4f", _shown(temperature),
                record["ece_before"], record["ece_after"])
    kept = {f.name: getattr(validation, f.name) for f in fields(EvalOutput)}
    return CalibratedOutput(**{**kept, "scores": after}, calibration=record)


def card_calibration(record: dict[str, Any]) -> dict[str, Any]:
    """The card's `calibration` field: the temperature, ECE before/after and the bin count."""
    return {k: record[k] for k in CARD_FIELDS}



def validation_metrics(validation: CalibratedOutput, data: TrainingData
                       ) -> tuple[dict[str, Any], list[float] | None]:
    """Full metrics for one validation pass; multi-label thresholds are tuned here, on the
    calibrated scores (F1 is scored on images the thresholds were not tuned on)."""
    scores, targets = validation.scores, validation.targets
    if data.task == "single_label":
        metrics, thresholds = single_label_metrics(scores, targets.astype(int),
                                                   data.classes), None
    else:
        metrics, thresholds = held_out_multi_label_metrics(scores, targets, data.classes)
    metrics["excluded"] = len(validation.failed)
    metrics["calibration"] = validation.calibration
    return metrics, thresholds


def _shown(temperature: float | list[float]) -> str:
    if isinstance(temperature, list):
        return "[" + ", ".join(f"{t:.3g}" for t in temperature) + "]"
    return f"{temperature:.3g}"
