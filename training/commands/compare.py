"""`compare`: several `fit` runs side by side. Each run folder is read and checked, the runs
are labelled by the settings that differ between them, and one table (compare.json,
compare.md) and the figures (training.compare_plots) are written."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.card import ModelCard
from models.checkpoint import (
    CARD_FILE,
    CURVES_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    CheckpointError,
    printable,
    read_card,
)
from training.commands.compare_markdown import markdown
from training.commands.compare_plots import (
    TRAIN_ACCURACY,
    plot_confusion_matrices,
    plot_curves,
    save_figure,
)
from training.config import CompareConfig, TrainConfig
from training.exceptions import TrainingError
from training.loop.metrics import monitor_name
from training.options import flag_of
from training.storage import write_atomically, write_errors

logger = logging.getLogger(__name__)

CONFUSION_MATRICES_FILE = "confusion_matrices.png"
JSON_FILE = "compare.json"
MARKDOWN_FILE = "compare.md"
# Where a run's files were and how it was shown, and the recipe's copy of --recipe ("name"):
# never what tells two models apart (when nothing else differs, the folder name does).
INCIDENTAL_KEYS = frozenset({"data", "output", "val", "resume", "overwrite", "progress",
                             "name"})
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "images_per_second")
# A label is drawn in the figures and written in compare.md: a card's value (a list of a
# million numbers, a path with a newline) is shown shortened and on one line.
MAX_VALUE_CHARS = 40  # one setting's value in a label
MAX_LABEL_CHARS = 120  # the settings part of a label
MAX_WHERE_CHARS = 80  # the folder part of a label (a long path keeps its end)

History = list[dict[str, float | None]]


class CompareError(TrainingError):
    """A run folder cannot be read, or the runs cannot be compared."""


@dataclass(frozen=True)
class Run:
    """One `fit` run folder, read and checked."""

    directory: Path
    card: ModelCard
    history: History
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        """The folder's name."""
        return self.directory.name or str(self.directory)

    @property
    def monitor(self) -> str:
        """The validation figure that picked the run's best epoch."""
        return monitor_name(self.card.task)

    @property
    def config(self) -> dict[str, Any]:
        """The options the run was given."""
        return self.card.training["config"]

    @property
    def settings(self) -> dict[str, Any]:
        """The config with the recipe's resolved values in place of "let the recipe choose"."""
        return {**self.config, **self.card.training["recipe"]}

    @property
    def has_train_accuracy(self) -> bool:
        """True when the history records the training accuracy (single-label runs)."""
        return self.card.task == "single_label" and TRAIN_ACCURACY in self.history[0]


def _number(text: str | None, where: str) -> float | None:
    """A finite number from a history cell (None for an empty one)."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise CompareError(f"{where} is not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise CompareError(f"{where} is not a finite number: {text!r}")
    return value


def read_history(path: Path, monitor: str) -> History:
    """history.csv as numbers, one dict per epoch; refused missing, empty or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompareError(f"{path}: file is missing (not a run folder written by fit?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path}: cannot be read ({exc})") from exc
    try:
        reader = csv.DictReader(io.StringIO(text))
        columns, rows = list(reader.fieldnames or []), list(reader)
    except csv.Error as exc:
        raise CompareError(f"{path}: is not valid CSV ({exc})") from exc
    required = (*HISTORY_COLUMNS, f"val_{monitor}")
    missing = [c for c in required if c not in columns]
    if missing:
        raise CompareError(f"{path}: has no column {', '.join(missing)} (columns: "
                           f"{', '.join(columns)[:200]})")
    if not rows:
        raise CompareError(f"{path}: holds no epoch")
    history = []
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise CompareError(f"{path}: line {line} has more cells than the header")
        parsed = {c: _number(row[c], f"{path}: line {line}, column {c}") for c in columns}
        empty = [c for c in required if parsed[c] is None]
        if empty:
            raise CompareError(f"{path}: line {line} has no value for {', '.join(empty)}")
        history.append(parsed)
    return history


def read_metrics(path: Path, card: ModelCard) -> dict[str, Any]:
    """metrics.json, checked for the monitored figure and a well-shaped confusion matrix."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CompareError(f"{path}: cannot be read as JSON ({exc})") from exc
    monitor = monitor_name(card.task)
    value = metrics.get(monitor) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CompareError(f"{path}: has no finite {monitor!r} (a {card.task} run's metrics)")
    matrix = metrics.get("confusion_matrix")
    n = card.num_classes
    if matrix is not None and not (
            isinstance(matrix, list) and len(matrix) == n
            and all(isinstance(r, list) and len(r) == n for r in matrix)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    for r in matrix for v in r)):
        raise CompareError(f"{path}: confusion_matrix must be {n} lists of {n} counts")
    return metrics


def _check_training_record(card: ModelCard, path: Path) -> None:
    """Refuse a card without the `training` block that `fit` writes."""
    t = card.training
    wanted = {"config": dict, "recipe": dict, "epochs_run": int, "best_epoch": int,
              "seconds": (int, float)}
    bad = [k for k, kind in wanted.items()
           if not isinstance(t.get(k), kind) or isinstance(t.get(k), bool)]
    if not bad and not all(k in t["config"] for k in ("weights", "image_size")):
        bad = ["config.weights", "config.image_size"]
    if bad:
        raise CompareError(f"{path}: training.{', training.'.join(bad)} missing or malformed "
                           "(not a card written by fit)")


def read_run(directory: Path) -> Run:
    """One run folder: its card, history and metrics, each checked."""
    if not directory.is_dir():
        raise CompareError(f"run folder {directory} does not exist or is not a folder")
    try:
        card = read_card(directory)
    except CheckpointError as exc:
        raise CompareError(f"{exc} (a RUN_DIR is a folder written by fit --output)") from exc
    _check_training_record(card, directory / CARD_FILE)
    history = read_history(directory / HISTORY_FILE, monitor_name(card.task))
    return Run(directory, card, history, read_metrics(directory / METRICS_FILE, card))


def _class_difference(a: Run, b: Run) -> str:
    only_a = [c for c in a.card.classes if c not in b.card.classes]
    only_b = [c for c in b.card.classes if c not in a.card.classes]
    if not only_a and not only_b:
        return "the same classes in another order"
    parts = [f"only {run.directory} has {', '.join(names[:10])}"
             for run, names in ((a, only_a), (b, only_b)) if names]
    return "; ".join(parts)


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuse runs of different tasks or different class lists, naming them."""
    tasks: dict[str, list[str]] = {}
    for run in runs:
        tasks.setdefault(run.card.task, []).append(str(run.directory))
    if len(tasks) > 1:
        shown = "; ".join(f"{task}: {', '.join(dirs)}" for task, dirs in tasks.items())
        raise CompareError(f"runs of different tasks cannot be compared ({shown})")
    first = runs[0]
    for run in runs[1:]:
        if run.card.classes != first.card.classes:
            raise CompareError(
                f"runs with different classes cannot be compared: {first.directory} has "
                f"{first.card.num_classes} classes, {run.directory} {run.card.num_classes}; "
                f"{_class_difference(first, run)}")


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _shown(value: Any) -> str:
    """A setting's value in a label: one line, at most MAX_VALUE_CHARS characters."""
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else \
        "none" if value is None else json.dumps(value, sort_keys=True)
    return printable(text[:2 * MAX_VALUE_CHARS], MAX_VALUE_CHARS)


def differing_keys(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """The settings that differ: (set differently in the configs, differing only as the
    recipe resolved them), incidental keys left out."""
    settings = [run.settings for run in runs]
    keys = [k for k in dict.fromkeys(k for s in settings for k in s) if k not in INCIDENTAL_KEYS]
    differing = [k for k in keys if len({_key(s.get(k)) for s in settings}) > 1]
    chosen = [k for k in differing if len({_key(r.config.get(k)) for r in runs}) > 1]
    return chosen, [k for k in differing if k not in chosen]


def run_labels(runs: Sequence[Run],
               keys: tuple[list[str], list[str]] | None = None) -> list[str]:
    """One distinct label per run: `key=value` for each differing setting (those set
    differently, else those resolved differently: `keys`, or `differing_keys(runs)`), else
    its folder."""
    chosen, derived = keys if keys is not None else differing_keys(runs)
    shown = chosen or derived
    base = [" ".join(f"{_setting_name(k)}={_shown(run.settings.get(k))}" for k in shown)
            for run in runs]
    base = [printable(b[:2 * MAX_LABEL_CHARS], MAX_LABEL_CHARS) for b in base]
    counts = Counter(base)
    labels = [_label_with(b, _where(run.name)) if not b or counts[b] > 1 else b
              for b, run in zip(base, runs, strict=True)]
    counts = Counter(labels)  # the same folder name in different places: the whole path
    labels = [_label_with(b, _where(str(run.directory))) if counts[label] > 1 else label
              for b, label, run in zip(base, labels, runs, strict=True)]
    counts = Counter(labels)  # paths alike in their last characters: numbered
    return [f"{label} #{i}" if counts[label] > 1 else label
            for i, label in enumerate(labels, start=1)]


def _where(text: str) -> str:
    """A folder name or path in a label: one line, its end kept when it is long."""
    text = printable(text[-2 * MAX_WHERE_CHARS:], limit=8 * MAX_WHERE_CHARS)
    return text if len(text) <= MAX_WHERE_CHARS else "..." + text[-(MAX_WHERE_CHARS - 3):]


def _setting_name(key: str) -> str:
    """A setting as the user spells it: the option's flag without its dashes."""
    return flag_of(TrainConfig, key).removeprefix("--")


def _label_with(base: str, where: str) -> str:
    return f"{base} ({where})" if base else where


def summary_row(run: Run, label: str, keys: Sequence[str]) -> dict[str, Any]:
    """The table's entry for one run; every number is the run's own, unchanged."""
    monitor, last, training = run.monitor, run.history[-1], run.card.training
    row: dict[str, Any] = {
        "label": label, "run": str(run.directory), "arch": run.card.arch,
        "weights": run.config["weights"], "image_size": run.config["image_size"],
        "epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
        f"best_val_{monitor}": run.metrics[monitor],
        "final_train_loss": last["train_loss"], "final_val_loss": last["val_loss"],
        f"final_val_{monitor}": last[f"val_{monitor}"],
        "best_images_per_second": max(r["images_per_second"] for r in run.history),
        "training_seconds": training["seconds"],
        "settings": {k: run.settings.get(k) for k in keys},
    }
    if run.has_train_accuracy:
        row["final_train_accuracy"] = last[TRAIN_ACCURACY]
    return row


def confusion_note(runs: Sequence[Run]) -> str | None:
    """Why confusion_matrices.png is left out (None when it is drawn)."""
    if runs[0].card.task != "single_label":
        return "multi-label runs have no confusion matrix"
    lacking = [run.name for run in runs if run.metrics.get("confusion_matrix") is None]
    if lacking:
        return f"no confusion matrix in {METRICS_FILE} of {', '.join(lacking)}"
    return None


def comparison(runs: Sequence[Run]) -> dict[str, Any]:
    """compare.json's content: the runs' task, classes, labels and one row per run."""
    chosen, derived = differing_keys(runs)
    labels = run_labels(runs, (chosen, derived))
    note = confusion_note(runs)
    return {
        "task": runs[0].card.task, "monitor": runs[0].monitor, "classes": runs[0].card.classes,
        "differing": {"set": chosen, "resolved": derived},
        "figures": {"curves": CURVES_FILE,
                    "confusion_matrices": None if note else CONFUSION_MATRICES_FILE},
        "confusion_matrices_left_out": note,
        "runs": [summary_row(run, label, chosen + derived)
                 for run, label in zip(runs, labels, strict=True)],
    }


def read_runs(directories: Sequence[Path]) -> list[Run]:
    """Every run folder read, each given once, and checked comparable."""
    seen: dict[Path, Path] = {}
    for directory in directories:
        where = directory.resolve()
        if where in seen:
            also = "" if str(seen[where]) == str(directory) else f" (also as {seen[where]})"
            raise CompareError(f"run folder {directory} is given twice{also}")
        seen[where] = directory
    runs = [read_run(directory) for directory in directories]
    check_comparable(runs)
    return runs


def prepare_output(cfg: CompareConfig) -> None:
    """Create --output; refuse a run folder, a file, or a non-empty folder without
    --overwrite."""
    out = cfg.output
    if out.exists() and not out.is_dir():
        raise CompareError(f"--output {out} is a file; it must be a folder")
    if out.resolve() in {run.resolve() for run in cfg.runs}:
        raise CompareError(f"--output {out} is one of the runs compared; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise CompareError(f"--output {out} is not empty; pass --overwrite to write into it "
                           "or choose another folder")
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Read, check and compare the runs; write the table and figures into --output."""
    runs = read_runs(cfg.runs)
    table = comparison(runs)
    prepare_output(cfg)
    labels = [row["label"] for row in table["runs"]]
    written = [cfg.output / CURVES_FILE]
    save_figure(written[0], plot_curves([run.history for run in runs], labels, table["monitor"]))
    matrices = cfg.output / CONFUSION_MATRICES_FILE
    if table["confusion_matrices_left_out"] is None:
        figure = plot_confusion_matrices([run.metrics["confusion_matrix"] for run in runs],
                                         labels, table["classes"])
        save_figure(matrices, figure)
        written.append(matrices)
    elif matrices.exists():  # left by an earlier comparison in this --output
        with write_errors(matrices):
            matrices.unlink()
    write_atomically(cfg.output / JSON_FILE,
                     json.dumps(table, indent=2, allow_nan=False) + "\n")
    write_atomically(cfg.output / MARKDOWN_FILE, markdown(table))
    written += [cfg.output / JSON_FILE, cfg.output / MARKDOWN_FILE]
    for path in written:
        logger.info("wrote %s", path)
    logger.info("compared %d runs (%s) in %s", len(runs), "; ".join(labels), cfg.output)
    return table
