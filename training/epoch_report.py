"""What one epoch of `fit` reports: the figure that picks the best epoch, the validation
metrics, the history row, and the run's closing summary of per-class recall."""

from __future__ import annotations

from typing import Any

from training.calibrate import CalibratedOutput
from training.fit_data import TrainingData
from training.loop import EpochStats, EvalOutput
from training.metrics import held_out_multi_label_metrics, single_label_metrics, summary


def monitor_name(task: str) -> str:
    """The validation figure that picks the best epoch."""
    return "accuracy" if task == "single_label" else "mAP"


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


def recall_summary(metrics: dict[str, Any], shown: int = 20) -> str:
    """Single-label: balanced accuracy and each class's recall (the lowest `shown` when there
    are more classes), for the run's closing line; empty for multi-label metrics."""
    recall = metrics.get("per_class_recall")
    if not recall:
        return ""
    ordered = sorted(recall.items(), key=lambda item: item[1])
    part = "" if len(ordered) <= shown else f" (lowest {shown} of {len(ordered)})"
    listed = ", ".join(f"{name} {value:.3f}" for name, value in ordered[:shown])
    return (f", balanced accuracy {metrics['balanced_accuracy']:.4f}, recall by class"
            f"{part}: {listed}")


def history_row(epoch: int, lr: float, stats: EpochStats, validation: EvalOutput,
                metrics: dict[str, Any]) -> dict[str, Any]:
    """One epoch's line of history.csv."""
    return {"epoch": epoch + 1, "lr": lr,
            "train_loss": round(stats.loss, 5),
            **({} if stats.accuracy is None else {"train_accuracy": round(stats.accuracy, 5)}),
            "val_loss": round(validation.loss, 5),
            **{f"val_{k}": round(v, 5) for k, v in summary(metrics).items()
               if k != "num_samples"},
            "images_per_second": round(stats.images_per_second, 1),
            "seconds": round(stats.seconds, 2)}
