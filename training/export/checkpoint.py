"""Exporting a trained model: its card, weights and report files, written as one unit."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision
from torch import nn

from models import checkpoint
from models.card import ModelCard, Preprocessing
from models.checkpoint import (
    CALIBRATION_FILE,
    CONFUSION_MATRIX_FILE,
    CURVES_FILE,
    METRICS_FILE,
    PR_CURVES_FILE,
)
from training.export import report
from training.loop.metrics import summary
from training.storage import write_errors

if TYPE_CHECKING:
    from training.unknown_rule import UnknownRule

logger = logging.getLogger(__name__)

# Written with each exported checkpoint (curves.png at the end of the run), never carried over.
PER_EXPORT_REPORTS = (METRICS_FILE, CONFUSION_MATRIX_FILE, PR_CURVES_FILE, CURVES_FILE,
                      CALIBRATION_FILE)
ReportWriters = Mapping[str, Callable[[Path], None]]


def versions() -> dict[str, str]:
    """Library versions recorded in every card."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def write_checkpoint(directory: Path, model: nn.Module, *, name: str, arch: str, task: str,
                     classes: list[str], preprocessing: Preprocessing, stem: str,
                     thresholds: list[float] | None, metrics: dict[str, Any],
                     training: dict[str, Any], reports: ReportWriters | None = None,
                     replaces: Collection[str] = (),
                     calibration: dict[str, Any] | None = None,
                     unknown: dict[str, Any] | None = None) -> Path:
    """Build the card and save weights + card + `reports` as one unit (models.checkpoint)."""
    card = ModelCard(name=name, arch=arch, task=task, classes=classes,
                     preprocessing=preprocessing, thresholds=thresholds, metrics=metrics,
                     training={**training, "versions": versions()}, stem=stem,
                     calibration=calibration, unknown=unknown)
    return checkpoint.save(directory, model, card, reports=reports, replaces=replaces)


def card_metrics(best_metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's `metrics`: the best epoch's scalar validation figures (and per-class recall)."""
    out = {**summary(best_metrics), "epoch": best_metrics["epoch"], "split": "validation"}
    for key in ("f1_thresholds", "per_class_recall"):
        if key in best_metrics:
            out[key] = best_metrics[key]
    return out


def validation_reports(task: str, best_metrics: dict[str, Any], classes: Sequence[str], *,
                       scores: np.ndarray, targets: np.ndarray,
                       thresholds: list[float] | None) -> ReportWriters:
    """The report files of one export: metrics.json and the task's diagnostic figure."""
    reports: dict[str, Callable[[Path], None]] = {
        METRICS_FILE: lambda p: report.write_metrics(p, best_metrics)}
    if task == "single_label":
        reports[CONFUSION_MATRIX_FILE] = lambda p: report.plot_confusion(
            p, best_metrics["confusion_matrix"], classes)
    else:
        reports[PR_CURVES_FILE] = lambda p: report.plot_pr_curves(
            p, scores, targets, classes, thresholds or [])
    if "calibration" in best_metrics:
        reports[CALIBRATION_FILE] = lambda p: report.plot_reliability(
            p, best_metrics["calibration"])
    return reports


def finish_checkpoint(directory: Path, model: nn.Module, *, training: dict[str, Any],
                      history: Sequence[dict[str, Any]], monitor: str,
                      unknown_rule: Callable[[nn.Module], UnknownRule | None] | None = None,
                      best_metrics: dict[str, Any] | None = None) -> None:
    """Load the exported (best) weights back into `model`; fit its unknown-input rule; rewrite
    the card with the whole run's `training` record and the rule (metrics.json too), and draw
    the curves beside it."""
    best, card = checkpoint.load(directory)
    model.load_state_dict(best.state_dict())
    rule = unknown_rule(model) if unknown_rule is not None else None
    reports: dict[str, Callable[[Path], None]] = {
        CURVES_FILE: lambda p: report.plot_curves(p, history, monitor)}
    if rule is not None:
        checkpoint.attach_class_means(model, rule.class_means)
        if best_metrics is not None:
            best_metrics["unknown"] = rule.record
            reports[METRICS_FILE] = lambda p: report.write_metrics(p, best_metrics)
    with write_errors(directory):
        write_checkpoint(directory, model, name=card.name, arch=card.arch, task=card.task,
                         classes=card.classes, preprocessing=card.preprocessing,
                         stem=card.stem, thresholds=card.thresholds, metrics=card.metrics,
                         training=training, calibration=card.calibration,
                         unknown=rule.record if rule is not None else None, reports=reports)
