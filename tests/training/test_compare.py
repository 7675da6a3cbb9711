"""`compare`: tiny real runs side by side; every number in the table is the runs' own, runs
that cannot be compared are refused with a message naming them."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.checkpoint import CARD_FILE, HISTORY_FILE, METRICS_FILE
from tests.training.conftest import tiny_config
from training.cli import main
from training.commands.compare import MAX_WHERE_CHARS, read_runs, run_labels
from training.commands.synth import generate
from training.config import SynthConfig
from training.distributed import DistInfo
from training.fit import FitRun

RUN_FILES = (CARD_FILE, HISTORY_FILE, METRICS_FILE)


def _fit(data: Path, out: Path, **overrides: object) -> Path:
    FitRun(tiny_config(data, out, **overrides), DistInfo()).run()
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    """The files `compare` reads, without the weights."""
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy(src / name, dst / name)
    return dst


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _compare(*args: object) -> int:
    return main(["compare", *map(str, args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, single_data: Path) -> dict[str, Path]:
    """Three single-label runs: resnet18 1 epoch, resnet20 2 epochs, resnet20 1 epoch at a
    lower lr (the CIFAR ResNet is the quick one to train)."""
    root = tmp_path_factory.mktemp("runs")
    return {"base": _fit(single_data, root / "base"),
            "cifar": _fit(single_data, root / "cifar", arch="resnet20", epochs=2),
            "low_lr": _fit(single_data, root / "low_lr", arch="resnet20", lr=5e-4)}


@pytest.fixture(scope="module")
def compared(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compared") / "out"
    assert _compare(*runs.values(), "--output", out) == 0
    return out


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory: pytest.TempPathFactory, multi_data: Path) -> Path:
    return _fit(multi_data, tmp_path_factory.mktemp("multi") / "multi", arch="resnet20")


def _history(run: Path) -> list[dict[str, str]]:
    with (run / HISTORY_FILE).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _markdown_rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]


def _assert_png(path: Path, min_width: int, min_height: int) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width >= min_width and height >= min_height, (width, height)
    assert width <= 6000 and height <= 6000
    assert pixels.std() > 10  # something is drawn on the white page
    return width, height


def test_figures_are_written_as_pngs(compared):
    _assert_png(compared / "curves.png", 800, 350)
    width, height = _assert_png(compared / "confusion_matrices.png", 900, 250)
    assert width > 2 * height  # three panels side by side
    assert sorted(p.name for p in compared.iterdir()) == [
        "compare.json", "compare.md", "confusion_matrices.png", "curves.png"]


def test_every_number_is_the_runs_own(compared, runs):
    table = json.loads((compared / "compare.json").read_text())
    assert table["task"] == "single_label" and table["monitor"] == "accuracy"
    md_rows = _markdown_rows(compared / "compare.md")
    assert len(table["runs"]) == len(md_rows) == 3
    for row, md, run in zip(table["runs"], md_rows, runs.values(), strict=True):
        card = json.loads((run / CARD_FILE).read_text())
        metrics = json.loads((run / METRICS_FILE).read_text())
        history = _history(run)
        last, training = history[-1], card["training"]
        expected = {
            "run": str(run), "arch": card["arch"], "weights": training["config"]["weights"],
            "image_size": training["config"]["image_size"],
            "epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
            "best_val_accuracy": metrics["accuracy"],
            "final_train_loss": float(last["train_loss"]),
            "final_val_loss": float(last["val_loss"]),
            "final_val_accuracy": float(last["val_accuracy"]),
            "best_images_per_second": max(float(r["images_per_second"]) for r in history),
            "training_seconds": training["seconds"],
        }
        assert {k: row[k] for k in expected} == expected
        assert row.get("final_train_accuracy") == (
            float(last["train_accuracy"]) if "train_accuracy" in last else None)
        assert len(history) == training["epochs_run"]
        assert md["run"] == row["label"] and md["folder"] == str(run)
        assert md["best val accuracy"] == f"{metrics['accuracy']:.4f}"
        assert md["final val loss"] == f"{float(last['val_loss']):.4f}"
        assert md["final train loss"] == f"{float(last['train_loss']):.4f}"
        assert md["best img/s"] == f"{expected['best_images_per_second']:.1f}"
        assert md["training s"] == f"{training['seconds']:.2f}"
        assert (md["epochs run"], md["best epoch"], md["image size"]) == (
            str(training["epochs_run"]), str(training["best_epoch"]), "32")


def test_labels_name_what_differs_and_only_that(compared, runs):
    table = json.loads((compared / "compare.json").read_text())
    assert table["differing"]["set"] == ["arch", "epochs", "lr"]
    assert {"stem", "warmup_epochs"} <= set(table["differing"]["resolved"])
    lrs = [json.loads((run / CARD_FILE).read_text())["training"]["recipe"]["lr"]
           for run in runs.values()]
    assert lrs[2] == 5e-4 and lrs[0] == lrs[1] != lrs[2]
    assert [row["label"] for row in table["runs"]] == [
        f"arch=resnet18 epochs=1 lr={lrs[0]:g}", f"arch=resnet20 epochs=2 lr={lrs[1]:g}",
        "arch=resnet20 epochs=1 lr=0.0005"]
    assert table["runs"][1]["settings"]["arch"] == "resnet20"
    text = (compared / "compare.md").read_text()
    for label in (row["label"] for row in table["runs"]):
        assert f"| {label} |" in text


def test_labels_without_differences_are_folder_names_and_collisions_get_them(runs, tmp_path):
    again = _copy_run(runs["base"], tmp_path / "again")
    assert run_labels(read_runs([runs["base"], again])) == ["base", "again"]
    base_lr = json.loads((runs["base"] / CARD_FILE).read_text())["training"]["recipe"]["lr"]
    assert run_labels(read_runs([runs["base"], runs["low_lr"], again])) == [
        f"arch=resnet18 lr={base_lr:g} (base)", "arch=resnet20 lr=0.0005",
        f"arch=resnet18 lr={base_lr:g} (again)"]
    namesake = _copy_run(runs["base"], tmp_path / "elsewhere" / "base")
    labels = run_labels(read_runs([runs["base"], namesake]))
    # each is its folder's path, or its end where the path is long (a test session of
    # pytest-xdist has longer temporary paths)
    assert len(set(labels)) == 2 and all(len(label) <= MAX_WHERE_CHARS for label in labels)
    for label, folder in zip(labels, [runs["base"], namesake], strict=True):
        assert label == str(folder) or (label.startswith("...")
                                        and str(folder).endswith(label[3:])), (label, folder)


def test_train_accuracy_is_shown_where_the_history_has_it(runs, tmp_path):
    rows = _history(runs["base"])
    with_it = _copy_run(runs["base"], tmp_path / "with")
    without = _copy_run(runs["base"], tmp_path / "without")
    for run, keep in ((with_it, True), (without, False)):
        edited = [{k: v for k, v in r.items() if keep or k != "train_accuracy"} for r in rows]
        if keep:
            for i, r in enumerate(edited):
                r.setdefault("train_accuracy", str(0.25 * (i + 1)))
        with (run / HISTORY_FILE).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(edited[0]))
            writer.writeheader()
            writer.writerows(edited)
    out = tmp_path / "out"
    assert _compare(with_it, without, "--output", out) == 0
    first, second = json.loads((out / "compare.json").read_text())["runs"]
    assert first["final_train_accuracy"] == float(_history(with_it)[-1]["train_accuracy"])
    assert "final_train_accuracy" not in second
    md = _markdown_rows(out / "compare.md")
    assert md[0]["final train accuracy"] == f"{first['final_train_accuracy']:.4f}"
    assert md[1]["final train accuracy"] == "-"
    _assert_png(out / "curves.png", 800, 350)
    neither = tmp_path / "neither"
    assert _compare(without, _copy_run(without, tmp_path / "copy"), "--output", neither) == 0
    assert "| final train accuracy |" not in (neither / "compare.md").read_text()


def test_multi_label_runs_compare_on_map_without_confusion_matrices(multi_run, tmp_path):
    copy = _copy_run(multi_run, tmp_path / "copy")
    out = tmp_path / "out"
    assert _compare(multi_run, copy, "--output", out) == 0
    table = json.loads((out / "compare.json").read_text())
    metrics = json.loads((multi_run / METRICS_FILE).read_text())
    assert table["task"] == "multi_label" and table["monitor"] == "mAP"
    assert [r["best_val_mAP"] for r in table["runs"]] == [metrics["mAP"]] * 2
    assert table["runs"][0]["final_val_mAP"] == float(_history(multi_run)[-1]["val_mAP"])
    assert [r["label"] for r in table["runs"]] == ["multi", "copy"]
    assert not (out / "confusion_matrices.png").exists()
    _assert_png(out / "curves.png", 800, 350)
    text = (out / "compare.md").read_text()
    assert "Confusion matrices left out: multi-label runs have no confusion matrix." in text
    assert "| best val mAP |" in text


def test_runs_on_other_classes_are_refused(runs, tmp_path, caplog):
    data = generate(SynthConfig(out=tmp_path / "two", task="single", size=32, per_class=8,
                                classes=2, seed=5))
    other = _fit(data, tmp_path / "two_classes", arch="resnet20")
    classes = json.loads((other / CARD_FILE).read_text())["classes"]
    only_base = [c for c in json.loads((runs["base"] / CARD_FILE).read_text())["classes"]
                 if c not in classes]
    out = tmp_path / "out"
    assert _compare(runs["base"], other, "--output", out) == 1
    (error,) = _errors(caplog)
    assert "runs with different classes cannot be compared" in error
    assert f"{runs['base']} has 3 classes, {other} 2" in error
    assert f"only {runs['base']} has {', '.join(only_base)}" in error
    assert not out.exists()


def test_runs_of_another_task_are_refused(runs, multi_run, tmp_path, caplog):
    out = tmp_path / "out"
    assert _compare(runs["base"], runs["cifar"], multi_run, "--output", out) == 1
    (error,) = _errors(caplog)
    assert error.endswith(f"runs of different tasks cannot be compared (single_label: "
                          f"{runs['base']}, {runs['cifar']}; multi_label: {multi_run})")
    assert not out.exists()


def _without_training_record(text: str) -> str:
    card = json.loads(text)
    card["training"] = {}
    return json.dumps(card)


def _break(run: Path, name: str, text: str | Callable[[str], str] | None) -> None:
    if text is None:
        (run / name).unlink()
    else:
        path = run / name
        path.write_text(text(path.read_text()) if callable(text) else text)


@pytest.mark.parametrize(("name", "text", "message"), [
    (CARD_FILE, None, "card.json: file is missing (a RUN_DIR is a folder written by fit"),
    (CARD_FILE, "{not json", "card.json: is not valid JSON"),
    (CARD_FILE, _without_training_record,
     "card.json: training.config, training.recipe, training.epochs_run, training.best_epoch, "
     "training.seconds missing or malformed (not a card written by fit)"),
    (HISTORY_FILE, None, "history.csv: file is missing"),
    (HISTORY_FILE, "epoch,lr\n1,0.1\n", "history.csv: has no column train_loss, val_loss"),
    (HISTORY_FILE, "epoch,train_loss,val_loss,val_accuracy,images_per_second\n",
     "history.csv: holds no epoch"),
    (HISTORY_FILE, "epoch,train_loss,val_loss,val_accuracy,images_per_second\n1,x,1,1,1\n",
     "history.csv: line 2, column train_loss is not a number: 'x'"),
    (HISTORY_FILE, "epoch,train_loss,val_loss,val_accuracy,images_per_second\n1,1,1,,1\n",
     "history.csv: line 2 has no value for val_accuracy"),
    (METRICS_FILE, "[1, 2", "metrics.json: cannot be read as JSON"),
    (METRICS_FILE, '{"mAP": 0.5}', "metrics.json: has no finite 'accuracy'"),
    (METRICS_FILE, '{"accuracy": 0.5, "confusion_matrix": [[1]]}',
     "metrics.json: confusion_matrix must be 3 lists of 3 counts"),
])
def test_unreadable_runs_are_one_line_errors(runs, tmp_path, caplog, name, text, message):
    broken = _copy_run(runs["base"], tmp_path / "broken")
    _break(broken, name, text)
    out = tmp_path / "out"
    assert _compare(runs["base"], broken, "--output", out) == 1
    (error,) = _errors(caplog)
    assert str(broken / name) in error and message in error and "\n" not in error
    assert not out.exists()


def test_a_missing_run_folder_on_the_command_line(runs, tmp_path):
    missing = tmp_path / "no_such_run"
    proc = subprocess.run(
        [sys.executable, "-m", "training", "compare", str(runs["base"]), str(missing),
         "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"run folder {missing} does not exist" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_output_is_not_overwritten_without_overwrite(runs, multi_run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    single = (runs["base"], runs["low_lr"])
    assert _compare(*single, "--output", out) == 1
    assert "is not empty; pass --overwrite" in _errors(caplog)[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _compare(*single, "--output", out, "--overwrite") == 0
    assert (out / "confusion_matrices.png").is_file()
    multi = (multi_run, _copy_run(multi_run, tmp_path / "copy"))
    assert _compare(*multi, "--output", out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "compare.json", "compare.md", "curves.png", "notes.txt"]  # the stale matrices gone
    assert (out / "notes.txt").read_text() == "mine"
    logged = caplog.text
    assert f"wrote {out / 'compare.md'}" in logged and f"wrote {out / 'curves.png'}" in logged


def test_a_run_folder_is_never_the_output(runs, tmp_path, caplog):
    before = (runs["base"] / "curves.png").read_bytes()
    assert _compare(runs["base"], runs["low_lr"], "--output", runs["base"], "--overwrite") == 1
    assert "is one of the runs compared" in _errors(caplog)[0]
    assert (runs["base"] / "curves.png").read_bytes() == before
    assert _compare(runs["base"], runs["base"], "--output", tmp_path / "o") == 1
    assert f"run folder {runs['base']} is given twice" in _errors(caplog)[1]


def _with_config(run: Path, **values: object) -> Path:
    card = json.loads((run / CARD_FILE).read_text())
    card["training"]["config"].update(values)
    (run / CARD_FILE).write_text(json.dumps(card))
    return run


def test_huge_values_and_odd_folder_names_are_shown_short_and_on_one_line(runs, tmp_path):
    import time

    huge = [_with_config(_copy_run(runs["base"], tmp_path / name), seed=[digit] * 1_300_000)
            for name, digit in (("zeros", 0), ("ones", 1))]  # cards of 3.9 MB
    odd = _copy_run(runs["base"], tmp_path / "line\nbreak | $\\frac{$")  # a folder name
    dollars = _copy_run(runs["base"], tmp_path / "sub" / "line\nbreak | $\\frac{$")
    out = tmp_path / "out"
    started = time.monotonic()
    assert _compare(*huge, odd, dollars, "--output", out) == 0
    assert time.monotonic() - started < 30
    labels = [row["label"] for row in json.loads((out / "compare.json").read_text())["runs"]]
    assert len(set(labels)) == 4 and all(len(label) <= 250 for label in labels), labels
    assert all("\n" not in label for label in labels)
    assert labels[0].startswith("seed=[0, 0, 0") and labels[0].endswith("...")
    assert "line\\nbreak" in labels[2]
    lines = [line for line in (out / "compare.md").read_text().splitlines()
             if line.startswith("|")]
    assert len(lines) == 2 + 4  # one table line per run: the newline split no row
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines]
    assert all(len(row) == len(cells[0]) for row in cells)  # the pipe split no cell
    assert "line\\nbreak \\| $" in cells[4][1]
    _assert_png(out / "curves.png", 800, 350)
    _assert_png(out / "confusion_matrices.png", 900, 250)
