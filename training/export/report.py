"""Report files beside a checkpoint: metrics.json, history.csv, curves and diagnostic figures."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # class names and labels are text: "$" is a dollar
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from training.loop.metrics import precision_recall_curve, summary  # noqa: E402

if TYPE_CHECKING:
    from training.loop.evaluate import EvalOutput
    from training.loop.train import EpochStats

logger = logging.getLogger(__name__)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """metrics.json: the best epoch's full validation metrics (strict JSON: no NaN)."""
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")


def history_csv(history: Sequence[dict[str, Any]]) -> str:
    """history.csv's text: one row per epoch."""
    out = io.StringIO()
    columns = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()



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


def plot_curves(path: Path, history: Sequence[dict[str, Any]], monitor: str) -> None:
    """curves.png: train/val loss and the monitored validation metric per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [r[f"val_{monitor}"] for r in history], marker="o", color="C2",
                   label="validation")
    if all(f"train_{monitor}" in r for r in history):  # single-label: accuracy as trained
        ax_metric.plot(epochs, [r[f"train_{monitor}"] for r in history], marker="o",
                       color="C0", linestyle="--", label="train (augmented, as trained)")
        ax_metric.legend()
    ax_metric.set(xlabel="epoch", ylabel=monitor, title=monitor, ylim=(0, 1.02))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(path: Path, matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> None:
    """confusion_matrix.png: rows are true classes, columns predictions (row-normalised colour)."""
    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = min(20, max(4, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(path: Path, scores: np.ndarray, targets: np.ndarray,
                   classes: Sequence[str], thresholds: Sequence[float]) -> None:
    """pr_curves.png: one precision-recall curve per class, its tuned threshold marked."""
    n = len(classes)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= n:
            ax.axis("off")
            continue
        positive = targets[:, j] > 0.5
        if positive.any():
            precision, recall, cut = precision_recall_curve(scores[:, j], positive)
            ax.step(recall, precision, where="post")
            k = int(np.argmin(np.abs(cut - thresholds[j])))
            ax.plot(recall[k], precision[k], "o", color="C3")
        ax.set(title=classes[j], xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall",
               ylabel="precision")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_reliability(path: Path, calibration: dict[str, Any]) -> None:
    """calibration.png: reliability diagrams before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, when in zip(axes, ("before", "after"), strict=True):
        diagram = calibration[f"reliability_{when}"]
        lower, upper = np.asarray(diagram["lower"]), np.asarray(diagram["upper"])
        filled = [i for i, n in enumerate(diagram["count"]) if n]
        accuracy = [diagram["accuracy"][i] for i in filled]
        confidence = [diagram["confidence"][i] for i in filled]
        ax.bar(lower[filled], accuracy, width=(upper - lower)[filled], align="edge",
               edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot(confidence, accuracy, "o", color="C3", markersize=4, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", aspect="equal",
               title=f"{when}: ECE {calibration[f'ece_{when}']:.3f}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="upper left", fontsize=8)
    temperature = calibration["temperature"]
    shown = f"{temperature:.3g}" if isinstance(temperature, float) else "one per class"
    fig.suptitle(f"reliability (validation, {calibration['bins']} bins), temperature {shown}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
