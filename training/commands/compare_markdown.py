"""compare.md: the comparison that training.compare builds, as a Markdown page."""

from __future__ import annotations

from typing import Any

from models.checkpoint import printable

MAX_CLASSES_SHOWN = 20
MAX_CELL_CHARS = 200  # a cell's text (a card's value may be a list of a million numbers)
FIGURE = "{:.4f}"  # losses, accuracies and mAP


def _text(text: str, limit: int = MAX_CELL_CHARS) -> str:
    """`text` from a card or a path, safe in a Markdown line: newlines and other control
    characters escaped (a run folder may be named with a newline), at most `limit`
    characters (only the start of a long text is looked at)."""
    return printable(text[:2 * limit], limit)


def _cell(value: Any, fmt: str) -> str:
    """A table cell: the value formatted on one line, pipes escaped, a dash for none."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else fmt.format(value)
    return _text(text).replace("|", "\\|")


def table_columns(monitor: str, train_accuracy: bool) -> list[tuple[str, str, str]]:
    """(header, row key, format) of each column of the runs table."""
    columns = [("run", "label", "{}"), ("folder", "run", "{}"), ("arch", "arch", "{}"),
               ("weights", "weights", "{}"), ("image size", "image_size", "{}"),
               ("epochs run", "epochs_run", "{}"), ("best epoch", "best_epoch", "{}"),
               (f"best val {monitor}", f"best_val_{monitor}", FIGURE),
               ("final train loss", "final_train_loss", FIGURE),
               ("final val loss", "final_val_loss", FIGURE),
               (f"final val {monitor}", f"final_val_{monitor}", FIGURE)]
    if train_accuracy:
        columns.append(("final train accuracy", "final_train_accuracy", FIGURE))
    return columns + [("best img/s", "best_images_per_second", "{:.1f}"),
                      ("training s", "training_seconds", "{:.2f}")]


def runs_table(table: dict[str, Any]) -> list[str]:
    """The Markdown lines of the table: one row per run."""
    rows = table["runs"]
    columns = table_columns(table["monitor"], any("final_train_accuracy" in r for r in rows))
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in columns) + " |"
              for row in rows]
    return lines


def _names(names: list[str]) -> str:
    shown = ", ".join(_text(n, 60) for n in names[:MAX_CLASSES_SHOWN])
    more = len(names) - MAX_CLASSES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def markdown(table: dict[str, Any]) -> str:
    """compare.md's text: what was compared, the table, which figures there are."""
    monitor, classes = table["monitor"], table["classes"]
    set_keys, resolved = table["differing"]["set"], table["differing"]["resolved"]
    differing = (f"set differently: {_names(set_keys) or 'nothing'}"
                 + (f"; resolved differently by the recipe: {_names(resolved)}"
                    if resolved else ""))
    train_accuracy = any("final_train_accuracy" in row for row in table["runs"])
    figures = [f"`{table['figures']['curves']}` (loss, and validation {monitor}"
               + (" with train accuracy where recorded" if train_accuracy else "")
               + "; train dashed, validation solid)"]
    if table["confusion_matrices_left_out"] is None:
        figures.append(f"`{table['figures']['confusion_matrices']}` (each run's best epoch on "
                       "its validation split, rows normalised)")
    lines = [
        f"# Comparison of {len(table['runs'])} runs", "",
        f"Task `{table['task']}`, {len(classes)} classes ({_names(classes)}). Best val "
        f"{monitor}: the best epoch's, from each run's metrics.json; final: the last epoch's, "
        "from its history.csv; training s: the card's.", "",
        f"Runs are labelled by the settings that differ (config and resolved recipe); "
        f"{differing}.", "",
        *runs_table(table), "",
        "Figures: " + ", ".join(figures) + ".",
    ]
    if table["confusion_matrices_left_out"] is not None:
        lines.append(f"Confusion matrices left out: {table['confusion_matrices_left_out']}.")
    return "\n".join(lines) + "\n"
