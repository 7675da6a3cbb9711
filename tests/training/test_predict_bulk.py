"""`predict` in process: its sources, its rows (errors included), continuing a file cut short,
refusing a file of other sources, a decoding process that dies, and a sharded merge redone."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from PIL import Image

from models.preprocessing import EvalCrop
from tests.predict_helpers import save_with_rule, write_images
from training.commands.predict import run as predict_run
from training.commands.predict import shards
from training.commands.predict.options import PredictConfig
from training.commands.predict.rows import RowFile, read_rows
from training.commands.predict.run import DIED_REASON, predict
from training.exceptions import ConfigError, OutputError

POISON = b"this file kills the process that decodes it"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, trained_model) -> Path:
    """A single-label checkpoint with a temperature and an unknown-input rule."""
    model, pre = trained_model
    return save_with_rule(tmp_path_factory.mktemp("ckpt") / "colors", model, pre, name="colors")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 varied images."""
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, count=12)
    return folder


def _cfg(ckpt: Path, sources: list[Path], output: Path, **options: object) -> PredictConfig:
    values: dict[str, object] = dict(checkpoint=ckpt, sources=sources, output=output,
                                     device="cpu", workers=0, batch_size=4, progress=False)
    values.update(options)
    return PredictConfig(**values)  # type: ignore[arg-type]


def test_every_kind_of_source_in_order_with_errors_as_rows(tmp_path: Path, ckpt: Path,
                                                           images: Path) -> None:
    shutil.copytree(images, tmp_path / "images")
    images = tmp_path / "images"
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.csv").write_text(f"id,image\n1,{images / '002.jpg'}\n2,../missing.jpg\n")
    (lists / "b.txt").write_text(f"# two files\n{images / '004.jpg'}\n\nbroken.png\n")
    (lists / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (300, 300), (9, 9, 9)).save(lists / "huge.png")
    (images / ".hidden.png").write_bytes(b"skipped")
    sources = [images, lists / "a.csv", lists / "b.txt", lists / "huge.png"]
    summary = predict(_cfg(ckpt, sources, tmp_path / "out.jsonl", max_pixels=200 * 200))
    rows = list(read_rows(tmp_path / "out.jsonl"))
    listed = [str(p) for p in sorted(images.rglob("[0-9]*.*"))]  # not the hidden one
    assert [r["path"] for r in rows] == [
        *listed, str(images / "002.jpg"), str(lists / "../missing.jpg"),
        str(images / "004.jpg"), str(lists / "broken.png"), str(lists / "huge.png")]
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {str(lists / "../missing.jpg"), str(lists / "broken.png"),
                           str(lists / "huge.png")}
    assert "cannot be read" in errors[str(lists / "../missing.jpg")]
    assert "90,000 pixels" in errors[str(lists / "huge.png")] or "pixels" in \
        errors[str(lists / "huge.png")]
    assert (summary.rows, summary.errors, summary.new_rows) == (len(rows), 3, len(rows))
    good = [r for r in rows if "error" not in r]
    assert all(len(r["predictions"]) == 3 and "unknown_score" in r for r in good)
    # the same image from two sources: the same row
    twice = [r for r in rows if r["path"].endswith("002.jpg")]
    assert twice[0]["predictions"] == twice[1]["predictions"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_cut_short_is_continued_to_the_same_rows(tmp_path: Path, ckpt: Path,
                                                        images: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    predict(_cfg(ckpt, [images], whole, all_scores=True))
    data = whole.read_bytes()
    lines = data.splitlines(keepends=True)
    for cut in (len(b"".join(lines[:5])) + 17, len(lines[0]) // 2):
        part = tmp_path / f"part{suffix}"
        part.write_bytes(data[:cut])  # a batch written in part, the last row torn
        summary = predict(_cfg(ckpt, [images], part, all_scores=True))
        _assert_same_rows(list(read_rows(part)), list(read_rows(whole)))
        assert summary.rows == len(list(read_rows(whole)))
        assert summary.new_rows < summary.rows or cut < len(lines[0])


def _assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    """The same paths in the same order, the same labels and scores (to float rounding: a
    batch of other images may round a score's last digits otherwise)."""
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        assert [p["label"] for p in row["predictions"]] == \
            [p["label"] for p in want["predictions"]]
        for label, score in want["scores"].items():
            assert abs(row["scores"][label] - score) <= 1e-5


def test_an_output_of_other_sources_is_refused_untouched(tmp_path: Path, ckpt: Path,
                                                         images: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "elsewhere.jpg", "error": "x"}) + "\n")
    with pytest.raises(OutputError, match="other sources"):
        predict(_cfg(ckpt, [images], out))
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(OutputError, match="not a row"):
        predict(_cfg(ckpt, [images], notes))
    assert notes.read_text() == '{"a": 1}\n{"b": 2}\n'
    table = tmp_path / "table.csv"
    table.write_text("name,size\nx,1\n")
    with pytest.raises(OutputError, match="header"):
        predict(_cfg(ckpt, [images], table))
    assert table.read_text() == "name,size\nx,1\n"
    with pytest.raises(ConfigError, match=".jsonl"):
        _cfg(ckpt, [images], tmp_path / "out.txt")


class _CrashingCrop(EvalCrop):
    """The server's crop, except that the poison file kills the process decoding it (as a
    crash in a decoder would)."""

    def __call__(self, data: bytes, max_pixels: int):
        if data == POISON:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(data, max_pixels)


def test_a_decoding_process_that_dies_costs_its_image_only(tmp_path: Path, ckpt: Path,
                                                           images: Path,
                                                           monkeypatch) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(images.glob("*.*"))[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "003_poison.png").write_bytes(POISON)
    monkeypatch.setattr(predict_run, "EvalCrop", _CrashingCrop)
    summary = predict(_cfg(ckpt, [folder], tmp_path / "out.csv", workers=2, batch_size=2))
    rows = list(read_rows(tmp_path / "out.csv"))
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in folder.iterdir())
    assert {Path(r["path"]).name: r.get("error") for r in rows if "error" in r} == \
        {"003_poison.png": DIED_REASON}
    assert summary.errors == 1 and summary.rows == 7
    with open(tmp_path / "out.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 8  # the header and one row per image, no repeat


def test_a_merge_cut_short_is_redone_from_the_plan(tmp_path: Path, ckpt: Path,
                                                   images: Path) -> None:
    whole = tmp_path / "whole.jsonl"
    predict(_cfg(ckpt, [images], whole))
    rows = whole.read_text().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(rows[:3]))  # a first run, stopped after 3 rows
    planned = [json.loads(r)["path"] for r in rows]
    plan = shards.make_plan(out, planned, 2, "digest", all_scores=False)
    assert (plan.start, plan.bounds(0), plan.bounds(1)) == (3, (3, 7), (7, 12))
    for rank in range(2):
        first, end = plan.bounds(rank)
        shards.part_path(out, rank, 2).write_text("".join(rows[first:end]))
    with open(out, "a") as f:
        f.write("".join(rows[3:5]) + rows[5][:10])  # the merge, killed part way
    assert shards.make_plan(out, planned, 2, "digest", all_scores=False) == plan
    shards.merge(out, plan, all_scores=False)
    assert out.read_text() == "".join(rows)
    assert not shards.is_interrupted(out)
    assert not list(tmp_path.glob("out.part*"))
    kept = RowFile.open(out)
    kept.close()
    assert kept.kept.paths == planned
