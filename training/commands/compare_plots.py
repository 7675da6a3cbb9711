"""The figures of `compare`: the runs' curves on shared axes and their confusion matrices side
by side (the Agg backend, as training.report uses)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # class names and labels are text: "$" is a dollar
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from training.storage import write_atomically  # noqa: E402

MAX_TICK_LABELS = 30  # class names per confusion-matrix axis; more classes show every k-th
MAX_COUNTS_SHOWN = 10  # counts are written in the cells up to this many classes
PANELS_PER_ROW = 4
TITLE_WIDTH = 36  # characters per line of a panel title
MAX_MARKED_EPOCHS = 40  # longer curves are drawn as plain lines
LOG_LOSS_SPAN = 30  # losses spread over more than this factor are drawn on a log scale
TRAIN_ACCURACY = "train_accuracy"  # a history column of single-label runs that record it

History = Sequence[dict[str, float | None]]


def run_colour(index: int) -> str:
    """One colour per run: matplotlib's ten, then tab20's twenty."""
    return f"C{index}" if index < 10 else plt.get_cmap("tab20")(index % 20)


def _series(history: History, column: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one history column, epochs without a value left out."""
    points = [(row["epoch"], row[column]) for row in history if row.get(column) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(histories: Sequence[History], labels: Sequence[str], monitor: str) -> Figure:
    """Loss and the monitored figure per epoch, one colour per run, train dashed, val solid."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4.2))
    marker = "o" if max(len(h) for h in histories) <= MAX_MARKED_EPOCHS else None
    losses: list[float] = []
    for i, history in enumerate(histories):
        colour = run_colour(i)
        for column, style in (("train_loss", "--"), ("val_loss", "-")):
            epochs, values = _series(history, column)
            ax_loss.plot(epochs, values, style, marker=marker, color=colour)
            losses += values
        if monitor == "accuracy":
            ax_metric.plot(*_series(history, TRAIN_ACCURACY), "--", marker=marker, color=colour)
        ax_metric.plot(*_series(history, f"val_{monitor}"), "-", marker=marker, color=colour)
    positive = [v for v in losses if v > 0]
    if positive and max(positive) > LOG_LOSS_SPAN * min(positive):
        ax_loss.set_yscale("log")  # an early spike would flatten every later epoch
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_metric.set(xlabel="epoch", ylabel=monitor, title=monitor, ylim=(0, 1.02))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles = [Line2D([], [], color=run_colour(i), marker=marker, label=label)
               for i, label in enumerate(labels)]
    handles += [Line2D([], [], color="black", linestyle="--", label="train"),
                Line2D([], [], color="black", linestyle="-", label="validation")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8,
               ncol=1 if max(map(len, labels)) > 50 else 2, frameon=False)
    fig.tight_layout()
    return fig


def tick_positions(n: int, cap: int = MAX_TICK_LABELS) -> range:
    """Which of `n` classes get a tick label: all up to `cap`, else every k-th."""
    return range(0, n, max(1, math.ceil(n / cap)))


def _confusion_panel(ax: plt.Axes, matrix: Sequence[Sequence[float]], classes: Sequence[str],
                     title: str) -> None:
    """One run's confusion matrix, rows (true classes) normalised."""
    counts = np.asarray(matrix, dtype=float)
    norm = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = tick_positions(n)
    fontsize = 8 if n <= MAX_TICK_LABELS / 2 else 6
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=fontsize)
    if n <= MAX_COUNTS_SHOWN:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title("\n".join(textwrap.wrap(title, TITLE_WIDTH)), fontsize=9)


def plot_confusion_matrices(matrices: Sequence[Sequence[Sequence[float]]],
                            labels: Sequence[str], classes: Sequence[str]) -> Figure:
    """The runs' confusion matrices side by side (up to four a row), titled by label."""
    cols = min(PANELS_PER_ROW, len(matrices))
    rows = math.ceil(len(matrices) / cols)
    side = min(8.0, max(3.5, 0.18 * len(classes) + 2.5))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, (side + 0.6) * rows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(matrices):]:
        ax.axis("off")
    for ax, matrix, label in zip(axes.flat, matrices, labels, strict=False):
        _confusion_panel(ax, matrix, classes, label)
    fig.suptitle("confusion matrices (validation, rows normalised)")
    return fig


def save_figure(path: Path, fig: Figure) -> None:
    """Write `fig` as a PNG atomically (the legend below the axes kept in) and close it."""
    try:
        write_atomically(path, lambda fh: fig.savefig(fh, format="png", dpi=100,
                                                      bbox_inches="tight"))
    finally:
        plt.close(fig)
