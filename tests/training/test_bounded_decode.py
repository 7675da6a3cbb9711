"""Training decodes within the same bounds as serving: DataLoader workers under a memory cap,
each image under a time budget; an image over either is skipped and counted, the run goes on."""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import torch

from tests.imagegen import photo, rgba_png_within_budget
from tests.training.conftest import tiny_config
from training.data.datasets import DecodeFailure, ImageDataset, make_loader
from training.data.discovery import Sample
from training.fit import fit


def _in_fresh_process(target: Callable[..., None], *args: object) -> None:
    """Run `target` in a newly spawned interpreter. A DataLoader worker's cap counts from its
    footprint at start, and a worker forked from this pytest process would inherit whatever
    heap earlier tests freed but kept mapped: room an image can decode into within the cap."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(300)
    assert process.exitcode == 0, f"the check in a fresh process failed (exit {process.exitcode})"


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


def _load_past_the_cap(tmp_path: Path) -> None:
    dataset, _heavy = _dataset(tmp_path, transform=_blank)
    loader = make_loader(dataset, batch_size=3, workers=1, shuffle=False, pin_memory=False,
                         worker_memory_mb=128)
    [batch] = list(loader)
    assert batch.failed.tolist() == [1] and batch.indices.tolist() == [0, 2]


def test_a_worker_over_its_memory_cap_skips_the_image_and_goes_on(tmp_path) -> None:
    _in_fresh_process(_load_past_the_cap, tmp_path)


def test_an_image_over_its_time_budget_is_skipped(tmp_path, caplog) -> None:
    dataset, heavy = _dataset(tmp_path, decode_seconds=0.05)
    with caplog.at_level(logging.WARNING):
        assert dataset[1] == DecodeFailure(1)
        assert not isinstance(dataset[0], DecodeFailure)
    assert "heavy.png" in caplog.text and "budget of 0.05 s" in caplog.text


def _fit(data: Path, out: Path) -> None:
    fit(tiny_config(data, out, workers=1, decode_memory_mb=128, val_fraction=0.01))


def test_fit_skips_and_counts_what_is_over_the_bounds(tmp_path, single_data) -> None:
    data = tmp_path / "data"
    for folder in single_data.iterdir():
        if folder.is_dir():
            (data / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir()):
                (data / folder.name / image.name).write_bytes(image.read_bytes())
    first = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (first / "zz-heavy.png").write_bytes(rgba_png_within_budget(6000, 6000))
    out = tmp_path / "out"
    _in_fresh_process(_fit, data, out)
    card = json.loads((out / "card.json").read_text())
    skipped = card["training"]["dataset"]["skipped"]
    assert any("zz-heavy.png" in path for path in json.dumps(skipped).split('"')), skipped
