"""Training decodes within the same bounds as serving: DataLoader workers under a memory cap,
each image under a time budget; an image over either is skipped and counted, the run goes on."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import pytest
import torch

from tests.imagegen import photo, rgba_png_within_budget
from tests.training.conftest import tiny_config
from training.data.datasets import DecodeFailure, ImageDataset, make_loader
from training.data.discovery import Sample
from training.fit import fit


def _blank(_image: object) -> torch.Tensor:
    return torch.zeros(3, 2, 2, dtype=torch.uint8)


def _dataset(tmp_path: Path, **kw: object) -> tuple[ImageDataset, Path]:
    good = tmp_path / "a" / "good.png"
    good.parent.mkdir(parents=True)
    photo((40, 30)).save(good)
    heavy = tmp_path / "a" / "heavy.png"  # 36 MP within the pixel budget, 540 MB to decode
    heavy.write_bytes(rgba_png_within_budget(6000, 6000))
    samples = [Sample(good, ("a",)), Sample(heavy, ("a",)), Sample(good, ("a",))]
    kw.setdefault("transform", _blank)
    return ImageDataset(samples, ["a"], "single_label", **kw), heavy


def _over_the_cap(loader_dir: Path, data: Path, out: Path) -> None:
    """Both capped runs, in a fresh interpreter: a loader's batch (to loader_dir/batch.json)
    and a fit (to out)."""
    dataset, _heavy = _dataset(loader_dir)
    loader = make_loader(dataset, batch_size=3, workers=1, shuffle=False, pin_memory=False,
                         worker_memory_mb=128)
    [batch] = list(loader)
    (loader_dir / "batch.json").write_text(json.dumps(
        {"failed": batch.failed.tolist(), "indices": batch.indices.tolist()}))
    fit(tiny_config(data, out, workers=1, decode_memory_mb=128, val_fraction=0.01))


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, single_data: Path) -> tuple[Path, Path]:
    """(loader folder, fit output) of `_over_the_cap`, run in a newly spawned interpreter.

    A DataLoader worker's cap counts from its footprint at start, and a worker forked from
    this pytest process would inherit whatever heap earlier tests freed but kept mapped: room
    an image can decode into within the cap. A fresh interpreter holds no such room."""
    root = tmp_path_factory.mktemp("capped")
    data = root / "data"
    for folder in single_data.iterdir():
        if folder.is_dir():
            (data / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir()):
                (data / folder.name / image.name).write_bytes(image.read_bytes())
    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (first / "zz-heavy.png").write_bytes(rgba_png_within_budget(6000, 6000))
    loader_dir, out = root / "loader", root / "out"
    loader_dir.mkdir()
    process = multiprocessing.get_context("spawn").Process(target=_over_the_cap,
                                                           args=(loader_dir, data, out))
    process.start()
    process.join(300)
    assert process.exitcode == 0, f"the capped runs failed (exit {process.exitcode})"
    return loader_dir, out


def test_a_worker_over_its_memory_cap_skips_the_image_and_goes_on(capped) -> None:
    batch = json.loads((capped[0] / "batch.json").read_text())
    assert batch == {"failed": [1], "indices": [0, 2]}


def test_an_image_over_its_time_budget_is_skipped(tmp_path, caplog) -> None:
    dataset, heavy = _dataset(tmp_path, decode_seconds=0.05)
    with caplog.at_level(logging.WARNING):
        assert dataset[1] == DecodeFailure(1)
        assert not isinstance(dataset[0], DecodeFailure)
    assert "heavy.png" in caplog.text and "budget of 0.05 s" in caplog.text


def test_fit_skips_and_counts_what_is_over_the_bounds(capped) -> None:
    card = json.loads((capped[1] / "card.json").read_text())
    skipped = card["training"]["dataset"]["skipped"]
    assert any("zz-heavy.png" in path for path in json.dumps(skipped).split('"')), skipped
