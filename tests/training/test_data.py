"""Dataset discovery, splits and bad-data reporting."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from training.data import (
    ImageDataset,
    Sample,
    discover,
    read_split,
    stratified_split,
)
from training.errors import CsvFormatError, EmptyClassError, MissingImageError


def _image(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)
    return path


def _samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/d/{c}/{i}.png"), (c,)) for c, n in counts.items() for i in range(n)]


def test_split_is_stratified_and_reproducible():
    samples = _samples({"a": 50, "b": 20, "c": 10})
    train, val = stratified_split(samples, fraction=0.2, seed=7)
    assert Counter(s.labels[0] for s in val) == {"a": 10, "b": 4, "c": 2}
    assert len(train) + len(val) == 80 and not set(train) & set(val)
    again = stratified_split(samples, fraction=0.2, seed=7)
    assert again == (train, val)
    other = stratified_split(samples, fraction=0.2, seed=8)
    assert other[1] != val


def test_multi_label_split_keeps_rare_labels_on_both_sides():
    samples = [Sample(Path(f"/d/{i}.png"), ("common",) + (("rare",) if i % 10 == 0 else ()))
               for i in range(100)]
    train, val = stratified_split(samples, fraction=0.2, seed=0)
    assert sum("rare" in s.labels for s in val) == 2
    assert sum("rare" in s.labels for s in train) == 8


def test_split_written_by_fit_is_reapplied(trained, single_data):
    _, out = trained
    payload = json.loads((out / "split.json").read_text())
    assert payload["seed"] == 0 and len(payload["val"]) == 6  # round(0.2 x 12) per class
    found = discover(single_data)
    train, val = read_split(out / "split.json", found.samples, found.root)
    assert sorted(s.path.relative_to(single_data).as_posix() for s in val) == payload["val"]
    assert (train, val) == stratified_split(found.samples, fraction=0.2, seed=0)


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog):
    for i in range(3):
        _image(tmp_path / "cat" / f"{i}.png")
        _image(tmp_path / "dog" / f"{i}.png", (10, 10, 200))
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING):
        found = discover(tmp_path)
    assert len(found.samples) == 6 and found.classes == ["cat", "dog"]
    assert "broken.jpg" in caplog.text


def test_image_that_fails_mid_run_is_replaced(tmp_path, caplog):
    good = _image(tmp_path / "a" / "good.png")
    bad = tmp_path / "a" / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])  # valid header, truncated data
    ds = ImageDataset([Sample(bad, ("a",)), Sample(good, ("a",))], ["a"], "single_label",
                      transform=lambda im: im.size)
    with caplog.at_level(logging.WARNING):
        size, _, index = ds[0]
    assert size == (20, 20) and index == 1
    assert "bad.png" in caplog.text


def test_empty_class_folder_is_reported(tmp_path):
    _image(tmp_path / "cat" / "0.png")
    (tmp_path / "dog").mkdir()
    with pytest.raises(EmptyClassError, match="dog"):
        discover(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "training", "fit", str(tmp_path), "--output",
         str(tmp_path / "out"), "--weights", "none", "--workers", "0"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "class folder 'dog' holds no images" in lines[0]
    assert "Traceback" not in proc.stderr


def test_csv_row_naming_a_missing_file(tmp_path):
    _image(tmp_path / "x.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,labels\nx.png,a b\nmissing.png,a\n")
    with pytest.raises(MissingImageError, match=r"labels.csv:3: image 'missing.png'"):
        discover(csv_path)


def test_csv_layout_and_task_override(tmp_path):
    for i in range(4):
        _image(tmp_path / "img" / f"{i}.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,labels\nimg/0.png,b a\nimg/1.png,a\nimg/2.png,\nimg/3.png,c\n")
    found = discover(csv_path)
    assert found.task == "multi_label" and found.classes == ["a", "b", "c"]
    ds = ImageDataset(found.samples, found.classes, found.task, transform=lambda im: im)
    assert ds.target(0).tolist() == [1.0, 1.0, 0.0] and ds.target(2).tolist() == [0, 0, 0]
    with pytest.raises(Exception, match="exactly one label"):
        discover(csv_path, task="single")
    (tmp_path / "bad.csv").write_text("path,label\nimg/0.png,a\n")
    with pytest.raises(CsvFormatError, match="image,labels"):
        discover(tmp_path / "bad.csv")
