"""Class folders that are not what they seem: names that are not UTF-8, linked folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.data.discovery import discover
from training.exceptions import DataError

LATIN1_NAME = os.fsdecode(b"caf\xe9")  # "café" as an old zip file names it: not UTF-8


def _images(folder: Path, count: int = 3, colour: tuple[int, int, int] = (200, 10, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")


def test_a_class_folder_named_in_latin1_is_refused_before_training(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    _images(data / "tea", 4, (10, 10, 200))
    _images(data / LATIN1_NAME, 4)
    with pytest.raises(DataError, match=r"class folder's name is not UTF-8 \(bytes b'caf\\xe9'\)"):
        discover(data)
    caplog.set_level(logging.INFO)
    code = main(["fit", str(data), "--output", str(out), "--arch", "resnet18", "--weights",
                 "none", "--image-size", "32", "--epochs", "1", "--workers", "0"])
    assert code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and not errors[0].exc_info
    message = errors[0].getMessage()
    assert "\n" not in message and "caf\\xe9" in message and "not UTF-8" in message
    assert "epoch 1/1" not in caplog.text and "data:" not in caplog.text  # nothing was trained
    assert not (out / "card.json").exists() and not (out / "last.pt").exists()


def test_a_link_back_into_the_data_folder_is_not_a_class(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    _images(data / "cat", 3)
    _images(data / "dog", 3, (10, 10, 200))
    (data / "loop").symlink_to(".")  # DATA/loop -> DATA: every image again
    (data / "kitten").symlink_to("cat")  # another class's images under a second name
    (data / "up").symlink_to("..")  # a folder holding DATA
    with caplog.at_level(logging.WARNING):
        found = discover(data)
    assert found.classes == ["cat", "dog"] and len(found.samples) == 6
    assert len({s.path.resolve() for s in found.samples}) == 6  # no image counted twice
    for name in ("loop", "kitten", "up"):
        assert f"{data / name}: left out" in caplog.text, caplog.text


def test_a_linked_class_folder_from_elsewhere_is_followed_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, shared = tmp_path / "data", tmp_path / "shared"
    _images(data / "cat", 3)
    _images(shared / "birds", 2, (10, 200, 10))
    (data / "bird").symlink_to(shared / "birds")  # a class kept on another disk: followed
    (data / "fowl").symlink_to(shared / "birds")  # the same folder again: left out
    with caplog.at_level(logging.WARNING):
        found = discover(data)
    assert found.classes == ["bird", "cat"] and len(found.samples) == 5
    assert f"{data / 'fowl'}: left out" in caplog.text


def test_class_names_that_look_like_tex_are_drawn_as_text(tmp_path: Path) -> None:
    from training.export.report import plot_confusion, plot_pr_curves

    classes = ["price $_{$ tag", "tea"]  # mathtext would refuse it, after the whole run
    plot_confusion(tmp_path / "confusion_matrix.png", [[3, 1], [0, 4]], classes)
    scores = np.array([[0.9, 0.2], [0.3, 0.8], [0.6, 0.1]])
    targets = np.array([[1, 0], [0, 1], [1, 0]])
    plot_pr_curves(tmp_path / "pr_curves.png", scores, targets, classes, [0.5, 0.5])
    for name in ("confusion_matrix.png", "pr_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
