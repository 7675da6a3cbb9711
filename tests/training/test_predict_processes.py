"""`python -m training predict` as users run it: killed with SIGKILL and run again, it ends
with every row once, in order; under torchrun with two CPU ranks, one ordered output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.predict_helpers import save_with_rule
from tests.serving_helpers import CLASSES, color_image
from tests.torchrun_helpers import REPO
from training.commands.predict.options import PredictConfig
from training.commands.predict.rows import read_rows
from training.commands.predict.run import predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, trained_model) -> Path:
    """A single-label checkpoint with a temperature and an unknown-input rule."""
    model, pre = trained_model
    return save_with_rule(tmp_path_factory.mktemp("ckpt") / "colors", model, pre, name="colors")


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        color_image(CLASSES[i % 3], seed=i, size=(24, 20)).save(folder / f"{i:04d}.png")
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _command(ckpt: Path, images: Path, out: Path, *options: str) -> list[str]:
    return ["-m", "training", "predict", str(ckpt), str(images), "--output", str(out),
            "--device", "cpu", "--no-progress", *options]


def _reference(ckpt: Path, images: Path, out: Path) -> list[dict]:
    predict(PredictConfig(checkpoint=ckpt, sources=[images], output=out, device="cpu",
                          workers=0, batch_size=16, progress=False))
    return list(read_rows(out))


def _assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    assert [r["path"] for r in rows] == [r["path"] for r in expected]  # none lost or twice
    for row, want in zip(rows, expected, strict=True):
        assert [p["label"] for p in row["predictions"]] == \
            [p["label"] for p in want["predictions"]]
        for mine, theirs in zip(row["predictions"], want["predictions"], strict=True):
            assert abs(mine["score"] - theirs["score"]) <= 1e-5
        assert abs(row["unknown_score"] - want["unknown_score"]) <= 1e-5


def test_a_killed_run_continues_with_every_row_once(tmp_path: Path, ckpt: Path) -> None:
    images = _images(tmp_path / "images", 120)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, *_command(ckpt, images, out, "--batch-size", "1",
                                         "--workers", "1")]
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stderr=subprocess.PIPE)
    give_up = time.monotonic() + 120
    while not out.exists() or out.read_bytes().count(b"\n") < 10:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < give_up, "no rows written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = out.read_bytes().count(b"\n")
    assert 10 <= written < 120, "the kill came after the run had finished"
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"already holds {written} of the 120 rows" in done.stderr
    _assert_same_rows(list(read_rows(out)), _reference(ckpt, images, tmp_path / "ref.jsonl"))


def test_two_torchrun_ranks_write_one_ordered_output(tmp_path: Path, ckpt: Path) -> None:
    images = _images(tmp_path / "images", 23)
    expected = _reference(ckpt, images, tmp_path / "ref.jsonl")
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:  # a run that stopped after 4 rows: the ranks share the rest
        f.writelines(json.dumps(row) + "\n" for row in expected[:4])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *_command(ckpt, images, out, "--batch-size", "4",
                                               "--workers", "0")]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    assert "joined process group: rank 1 of 2" in done.stderr
    _assert_same_rows(list(read_rows(out)), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out.jsonl", "ref.jsonl"]
