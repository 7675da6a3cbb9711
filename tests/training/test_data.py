"""Dataset discovery, splits and bad-data reporting."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.imagegen import photo, png_bomb
from training.data.datasets import DecodeFailure, ImageDataset, collate
from training.data.discovery import Sample, discover
from training.data.images import load_training_image
from training.data.split import read_split, split_payload, stratified_split
from training.exceptions import CsvFormatError, DataError, EmptyClassError, MissingImageError


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


def test_image_that_fails_mid_run_is_left_out_with_its_label(tmp_path, caplog):
    good = _image(tmp_path / "a" / "good.png")
    bad = tmp_path / "b" / "bad.png"
    bad.parent.mkdir()
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) - 30])  # valid header, truncated pixel data
    ds = ImageDataset([Sample(bad, ("b",)), Sample(good, ("a",))], ["a", "b"], "single_label",
                      transform=lambda im: torch.zeros(3, 4, 4, dtype=torch.uint8))
    with caplog.at_level(logging.WARNING):
        assert ds[0] == DecodeFailure(0)  # not the next image with the next label
        batch = collate([ds[0], ds[1]])
    assert batch.indices.tolist() == [1] and batch.targets.tolist() == [0]
    assert batch.failed.tolist() == [0] and batch.images.shape == (1, 3, 4, 4)
    assert "bad.png" in caplog.text
    everything_failed = collate([ds[0]])
    assert everything_failed.images.shape[0] == 0 and everything_failed.failed.tolist() == [0]


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


def _jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)
          ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(size, colour).save(path, "JPEG", quality=80)
    return path


def test_bomb_and_oversized_images_are_skipped_at_discovery(tmp_path, caplog):
    for i in range(2):
        _image(tmp_path / "cat" / f"{i}.png")
        _image(tmp_path / "dog" / f"{i}.png", (10, 10, 200))
    (tmp_path / "cat" / "bomb.png").write_bytes(png_bomb())  # 400 MP in a few kB
    photo((600, 500)).save(tmp_path / "dog" / "huge.png")  # 300,000 px
    big_jpeg = _jpeg(tmp_path / "dog" / "photo.jpg", (600, 500))
    with caplog.at_level(logging.WARNING):
        found = discover(tmp_path, max_pixels=100_000)
    assert {p.name for p, _ in found.skipped} == {"bomb.png", "huge.png"}
    assert big_jpeg in [s.path for s in found.samples]  # a JPEG is decoded reduced instead
    assert "bomb.png" in caplog.text and "huge.png" in caplog.text
    assert "skipped 2 of 7 images" in caplog.text


def test_oversized_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    big = _jpeg(tmp_path / "a" / "photo.jpg", (1200, 900))
    png = tmp_path / "a" / "photo.png"
    photo((1200, 900)).save(png)
    image = load_training_image(big, max_pixels=300_000)
    assert image.size == (600, 450) and image.mode == "RGB"
    assert load_training_image(big, max_pixels=300_000, target_size=100).size == (150, 113)
    ds = ImageDataset([Sample(big, ("a",)), Sample(png, ("a",))], ["a"], "single_label",
                      transform=lambda im: torch.zeros(3, 2, 2, dtype=torch.uint8),
                      max_pixels=300_000)
    assert not isinstance(ds[0], DecodeFailure)
    assert ds[1] == DecodeFailure(1)  # a PNG cannot be reduced before decoding: skipped


def test_csv_with_bom_duplicates_and_paths_outside_its_folder(tmp_path, caplog):
    data = tmp_path / "data"
    images = [_image(data / "img" / f"{i}.png") for i in range(6)]
    outside = _image(tmp_path / "shared" / "x.png")
    absolute = _image(tmp_path / "elsewhere" / "y.png")
    rows = [f"img/{i}.png,{'a' if i % 2 else 'b'}" for i in range(6)]
    rows += ["img/1.png,a", "./img/2.png,c", "../shared/x.png,a", f"{absolute},b"]
    csv_path = data / "labels.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + ("image,labels\n" + "\n".join(rows) + "\n").encode())
    with caplog.at_level(logging.WARNING):
        found = discover(csv_path)
    assert len(found.samples) == 8 and "2 rows repeat an image" in caplog.text
    labels = {s.path.resolve(): s.labels for s in found.samples}
    assert labels[images[2].resolve()] == ("b", "c") and labels[images[1].resolve()] == ("a",)
    assert outside.resolve() in labels and absolute.resolve() in labels
    train, val = stratified_split(found.samples, fraction=0.25, seed=0)
    assert not {s.path.resolve() for s in train} & {s.path.resolve() for s in val}
    split_file = tmp_path / "split.json"
    split_file.write_text(split_payload(found.root, train, val, seed=0, fraction=0.25))
    assert "../shared/x.png" in split_file.read_text()
    assert read_split(split_file, found.samples, found.root) == (train, val)


def test_csv_that_is_not_utf8_is_named(tmp_path):
    _image(tmp_path / "x.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes("image,labels\nx.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CsvFormatError, match=r"labels.csv:2: not UTF-8 text \(byte 0xe9\)"):
        discover(csv_path)


def test_decomposed_class_names_match_composed_ones(tmp_path):
    nfd = unicodedata.normalize("NFD", "caf\u00e9")
    for i in range(2):
        _image(tmp_path / nfd / f"{i}.png")
        _image(tmp_path / "tea" / f"{i}.png", (10, 10, 200))
    assert discover(tmp_path).classes == ["caf\u00e9", "tea"]  # NFC, as a card holds it
    pinned = discover(tmp_path, classes=["tea", "caf\u00e9", "milk"])
    assert {s.labels for s in pinned.samples} == {("caf\u00e9",), ("tea",)}


def test_macos_leftovers_are_not_classes_or_images(tmp_path):
    for i in range(2):
        _image(tmp_path / "cat" / f"{i}.png")
        _image(tmp_path / "dog" / f"{i}.png", (10, 10, 200))
    _image(tmp_path / "__MACOSX" / "cat" / "0.png")
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    found = discover(tmp_path)
    assert found.classes == ["cat", "dog"] and len(found.samples) == 4 and not found.skipped


def test_one_class_folder_is_refused_with_a_hint(tmp_path):
    for i in range(4):
        _image(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "labels.csv").write_text("image,labels\n0.png,a\n")
    with pytest.raises(DataError, match=r"found one class folder \('images', 4 images\).*"
                                        r"pass the CSV instead.*labels.csv"):
        discover(tmp_path)
    assert discover(tmp_path, classes=["images", "other"]).classes == ["images", "other"]


def test_class_without_validation_support_is_warned(tmp_path, caplog, tiny_config):
    from models.device import Accelerator
    from training.context import RunContext
    from training.data.load import load_data
    from training.distributed import DistInfo
    from training.recipe import resolve

    for i in range(5):
        _image(tmp_path / "data" / "cat" / f"{i}.png")
    _image(tmp_path / "data" / "dog" / "0.png", (10, 10, 200))
    cfg = tiny_config(tmp_path / "data", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.WARNING):
        data = load_data(RunContext(cfg, resolve(cfg), DistInfo(),
                                    Accelerator.create("cpu", "fp32")))
    assert len(data.val) == 1 and "class 'dog' has no validation image" in caplog.text


def test_discovery_measures_what_an_icon_holds_before_decoding_it(tmp_path, monkeypatch):
    from PIL import Image

    from tests.imagegen import ico_embedding, png_bomb
    from training.data.images import skip_reason

    disguised = tmp_path / "favicon.png"  # an ICO under an accepted suffix
    disguised.write_bytes(ico_embedding(png_bomb(13000, 13000)))
    loads = []
    real = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1) or real(self))
    reason = skip_reason(disguised, max_pixels=40_000_000)
    assert reason is not None and "13000x13000" in reason and loads == []
