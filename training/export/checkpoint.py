"""Exporting a trained model: its card, weights and report files, written as one unit.

A fit exports the best epoch when it is reached (`Exporter.best_epoch`: a checkpoint a killed
run still leaves behind) and once more at its end (`Exporter.final`: the best weights, kept in
memory since their export, with the whole run's record, the unknown-input rule and the curves);
each export writes the checkpoint once. The final card also holds the drift reference: the
validation images scored by the checkpoint as the server will load it (training.export.drift).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torchvision
from torch import nn

from models import checkpoint
from models.architectures import build
from models.card import ModelCard
from models.checkpoint import (
    CALIBRATION_FILE,
    CONFUSION_MATRIX_FILE,
    CURVES_FILE,
    METRICS_FILE,
    PR_CURVES_FILE,
)
from models.unknown import attach_state
from training.exceptions import DataError
from training.export import report
from training.export.drift import drift_reference
from training.loop.evaluate import CalibratedOutput, card_calibration
from training.loop.metrics import monitor_name, summary
from training.storage import write_errors

if TYPE_CHECKING:
    from training.context import RunContext
    from training.data.load import TrainingData
    from training.unknown_rule import UnknownRule

logger = logging.getLogger(__name__)

# Written with each exported checkpoint (curves.png at the end of the run), never carried over.
PER_EXPORT_REPORTS = (METRICS_FILE, CONFUSION_MATRIX_FILE, PR_CURVES_FILE, CURVES_FILE,
                      CALIBRATION_FILE)
ReportWriters = Mapping[str, Callable[[Path], None]]


def versions() -> dict[str, str]:
    """Library versions recorded in every card."""
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def write_checkpoint(directory: Path, model: nn.Module, card: ModelCard, *,
                     reports: ReportWriters | None = None,
                     replaces: Collection[str] = ()) -> Path:
    """Save weights + card (its training record given the library versions) + `reports` as
    one unit (models.checkpoint)."""
    card = dataclasses.replace(card, training={**card.training, "versions": versions()})
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


class Exporter:
    """The checkpoint of one fit in --output, and the best weights since they were written."""

    def __init__(self, run: RunContext, data: TrainingData) -> None:
        self.run, self.data = run, data
        self.best: tuple[dict[str, torch.Tensor], ModelCard] | None = None
        try:  # fail before training, not after it, when the card could not hold these values
            self.card()
        except ValueError as exc:
            raise DataError(f"{run.cfg.data}: cannot be written into a checkpoint card: "
                            f"{exc}") from exc

    def card(self, **fields: Any) -> ModelCard:
        """This run's card with `fields` (metrics, thresholds, training, ...)."""
        cfg, data, parent = self.run.cfg, self.data, self.run.parent
        return ModelCard(name=self.run.name, arch=cfg.arch, task=data.task,
                         classes=data.classes, preprocessing=data.preprocessing,
                         stem=self.run.recipe.stem,
                         parent=parent.record if parent is not None else None, **fields)

    def best_epoch(self, model: nn.Module, validation: CalibratedOutput,
                   thresholds: list[float] | None, *, best_metrics: dict[str, Any],
                   training: dict[str, Any]) -> None:
        """Write the best epoch so far as the checkpoint, with its report files, and keep
        its weights for the final export."""
        reports = validation_reports(self.data.task, best_metrics, self.data.classes,
                                     scores=validation.scores, targets=validation.targets,
                                     thresholds=thresholds)
        card = self.card(thresholds=thresholds, metrics=card_metrics(best_metrics),
                         training=training,
                         calibration=card_calibration(validation.calibration))
        with write_errors(self.run.cfg.output):
            write_checkpoint(self.run.cfg.output, model, card, reports=reports,
                             replaces=PER_EXPORT_REPORTS)
        weights = {k: v.detach().to("cpu", copy=True) for k, v in
                   model.state_dict().items()}
        self.best = (weights, card)

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model`: kept since their export, or, in a
        resumed run that has not bettered them, read from the checkpoint written before."""
        if self.best is None:
            saved, card = checkpoint.load(self.run.cfg.output)
            self.best = (saved.state_dict(), card)
        model.load_state_dict(self.best[0])

    def final(self, model: nn.Module, *, training: dict[str, Any],
              history: Sequence[dict[str, Any]], best_metrics: dict[str, Any],
              rule: UnknownRule | None) -> None:
        """Write the best weights (`restore_best`) once more, with the whole run's training
        record and the unknown-input rule in the card (metrics.json too), and the curves."""
        if self.best is None:
            raise RuntimeError("restore_best comes first: the final export writes its weights")
        best = self.best[1]
        monitor = monitor_name(self.data.task)
        reports: dict[str, Callable[[Path], None]] = {
            CURVES_FILE: lambda p: report.plot_curves(p, history, monitor)}
        if rule is not None:
            attach_state(model, rule.state)
            best_metrics["unknown"] = rule.record
            reports[METRICS_FILE] = lambda p: report.write_metrics(p, best_metrics)
        card = self.card(thresholds=best.thresholds, metrics=best.metrics, training=training,
                         calibration=best.calibration,
                         unknown=rule.record if rule is not None else None)
        cfg = self.run.cfg
        drift = drift_reference(self.served_model(card, rule), card, self.data.val,
                                accelerator=self.run.accelerator,
                                batch_size=2 * self.run.recipe.batch_size, workers=cfg.workers)
        with write_errors(cfg.output):
            write_checkpoint(cfg.output, model, dataclasses.replace(card, drift=drift),
                             reports=reports)

    def served_model(self, card: ModelCard, rule: UnknownRule | None) -> nn.Module:
        """The best weights as `checkpoint.load` gives them to the server: a fresh model on
        the CPU, in eval mode, with the rule's state."""
        model = build(card.arch, num_classes=card.num_classes, weights=None, stem=card.stem)
        model.load_state_dict(self.best[0])
        if rule is not None:
            attach_state(model, rule.state)
        return model.eval()
