"""`python -m training predict` answers what the real server's /predict answers: the same
images through both give the same labels, in the same order, with scores equal within 1e-5
(a checkpoint with a calibration temperature and an unknown-input rule, and a multi-label
one with tuned thresholds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.predict_helpers import save_with_rule, write_images
from tests.server_process import ROOT, serving

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


def _predict_cli(checkpoint: Path, source: Path, output: Path, *options: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "training", "predict", str(checkpoint), str(source),
         "--output", str(output), "--device", "cpu", "--workers", "1", "--batch-size", "5",
         "--no-progress", *options],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in output.read_text().splitlines()]


def _served(url: str, model: str, paths: list[Path], query: str) -> dict[str, dict]:
    files = [("file", (str(p), p.read_bytes(), "application/octet-stream")) for p in paths]
    answer = httpx.post(f"{url}/predict?model={model}&{query}", files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    return {r["filename"]: r for r in answer.json()["results"]}


def _assert_same(row: dict, served: dict) -> None:
    assert [p["label"] for p in row["predictions"]] == \
        [p["label"] for p in served["predictions"]], (row, served)
    for mine, theirs in zip(row["predictions"], served["predictions"], strict=True):
        assert abs(mine["score"] - theirs["score"]) <= TOLERANCE, (row, served)
    assert row.get("unknown") == served.get("unknown")
    if "unknown_score" in served:
        assert abs(row["unknown_score"] - served["unknown_score"]) <= TOLERANCE
    for label, score in served.get("scores", {}).items():
        assert abs(row["scores"][label] - score) <= TOLERANCE


def test_bulk_rows_equal_the_real_servers_answers(tmp_path: Path, trained_model,
                                                  checkpoint_root: Path) -> None:
    model, pre = trained_model
    served_dir = tmp_path / "checkpoints"
    save_with_rule(served_dir / "calibrated", model, pre, name="calibrated")
    (served_dir / "tags").symlink_to(checkpoint_root / "tags", target_is_directory=True)
    images = write_images(tmp_path / "images", count=14)
    single = _predict_cli(served_dir / "calibrated", tmp_path / "images", tmp_path / "a.jsonl",
                          "--top-k", "3")
    multi = _predict_cli(served_dir / "tags", tmp_path / "images", tmp_path / "b.jsonl",
                         "--all-scores")
    assert [row["path"] for row in single] == [str(p) for p in images]
    assert all("unknown_score" in row for row in single), single
    with serving(served_dir, tmp_path / "server.log", "--max-batch-size", "4",
                 "--torch-threads", "1") as url:
        by_file = _served(url, "calibrated", images, "top_k=3")
        tags = _served(url, "tags", images, "all_scores=true")
    for row in single:
        _assert_same(row, by_file[row["path"]])
    for row in multi:
        _assert_same(row, tags[row["path"]])
