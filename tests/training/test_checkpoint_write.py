"""Writing checkpoints and resume states: one unit, never mixed, never half-written."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import models.atomic
from models import checkpoint
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.checkpoint import CheckpointError
from training.commands.evaluate import evaluate_checkpoint
from training.config import EvaluateConfig
from training.exceptions import DiskFullError
from training.loop.state import load_state, save_state

REPO = Path(__file__).resolve().parents[2]

# Saves two different models in turn into one folder, forever, printing a line after each.
SAVER = textwrap.dedent("""
    import json, sys, torch
    from models import checkpoint
    from models.architectures import build
    from models.card import ModelCard, Preprocessing
    target = sys.argv[1]
    nets = []
    for version in range(2):
        torch.manual_seed(version)
        nets.append(build("resnet18", num_classes=2))
    i = 0
    while True:
        v = i % 2
        card = ModelCard(name="m", arch="resnet18", task="single_label", classes=["a", "b"],
                         preprocessing=Preprocessing(resize=32, crop=32), metrics={"v": v})
        checkpoint.save(target, nets[v], card, reports={
            "metrics.json": lambda p, v=v: p.write_text(json.dumps({"v": v}))})
        print(i, flush=True)
        i += 1
""")


def _card(**metrics: object) -> ModelCard:
    return ModelCard(name="m", arch="resnet18", task="single_label", classes=["a", "b"],
                     preprocessing=Preprocessing(resize=32, crop=32), metrics=dict(metrics))


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("resnet18", num_classes=2)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class _FullDiskFile:
    """A real file with room for `room` more bytes, failing past them as a full disk does."""

    def __init__(self, path: str | Path, mode: str, room: int = 4096) -> None:
        self._file = open(path, mode)  # noqa: SIM115 - closed by __exit__
        self._room = room

    def write(self, data: bytes) -> int:
        size = memoryview(data).nbytes
        if size > self._room:
            self._file.write(bytes(data)[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._file.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the files the atomic writer opens run out of space after a few kB (as on a real
    full disk, torch.save then fails while closing its zip: see training.state)."""
    monkeypatch.setattr(models.atomic, "open", _FullDiskFile, raising=False)


@pytest.mark.parametrize("saves_before_kill", [1, 2, 3])
def test_kill_during_saves_never_leaves_a_mixed_checkpoint(tmp_path, saves_before_kill):
    target = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(saves_before_kill):
            assert proc.stdout.readline(), "the saver died"
    finally:
        proc.send_signal(signal.SIGKILL)  # most likely in the middle of the next save
        proc.wait(timeout=60)
    checkpoint.verify_weights(target)
    model, card = checkpoint.load(target)
    version = card.metrics["v"]
    assert json.loads((target / "metrics.json").read_text()) == {"v": version}
    torch.testing.assert_close(model.fc.weight, _net(version).fc.weight)
    checkpoint.save(target, _net(0), _card(v=0))  # the next save clears what the kill left
    assert _leftovers(tmp_path) == [] and _leftovers(target) == []


def test_files_are_written_with_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        checkpoint.save(tmp_path / "m", _net(0), _card())
        save_state(tmp_path / "m" / "last.pt", {"epoch": 1})
    finally:
        os.umask(previous)
    for path in (tmp_path / "m", *(tmp_path / "m").iterdir()):
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def test_other_files_in_the_folder_survive_a_save(tmp_path):
    target = tmp_path / "m"
    checkpoint.save(target, _net(0), _card(),
                    reports={"pr_curves.png": lambda p: p.write_text("x")})
    (target / "history.csv").write_text("epoch\n1\n")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("kept")
    checkpoint.save(target, _net(1), _card(), replaces=["pr_curves.png"])
    assert (target / "history.csv").read_text() == "epoch\n1\n"
    assert (target / "notes" / "a.txt").read_text() == "kept"
    assert not (target / "pr_curves.png").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    target = tmp_path / "m"
    checkpoint.save(target, _net(0), _card(v=0))
    broken = _net(1)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite values.*fc.weight"):
        checkpoint.save(target, broken, _card(v=1))
    with pytest.raises(CheckpointError, match="cannot be written as JSON"):
        checkpoint.save(target, _net(1), _card(loss=float("nan")))
    assert checkpoint.read_card(target).metrics == {"v": 0}
    assert _leftovers(tmp_path) == []


def test_full_disk_keeps_the_last_good_files_and_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "m"
    checkpoint.save(target, _net(0), _card(v=0))
    save_state(target / "last.pt", {"epoch": 1})
    _disk_full(monkeypatch)
    with pytest.raises(DiskFullError, match=r"^no space left on .*last\.pt"):
        save_state(target / "last.pt", {"epoch": 2, "big": torch.zeros(100_000)})
    with pytest.raises(OSError) as err:
        checkpoint.save(target, _net(1), _card(v=1))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_state(target / "last.pt") == {"epoch": 1}
    checkpoint.verify_weights(target)
    assert checkpoint.read_card(target).metrics == {"v": 0}
    assert _leftovers(tmp_path) == [] and _leftovers(target) == []


def test_evaluate_refuses_weights_and_card_from_different_saves(trained, single_data, tmp_path):
    _, out = trained
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    other = tmp_path / "other"
    model, card = checkpoint.load(out)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    checkpoint.save(other, model, card)
    shutil.copy(other / checkpoint.WEIGHTS_FILE, mixed / checkpoint.WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="come from different saves"):
        evaluate_checkpoint(EvaluateConfig(checkpoint=mixed, data=single_data, device="cpu"))


def test_full_disk_mid_run_is_one_line_and_keeps_the_best_so_far(single_data, tmp_path,
                                                                   monkeypatch, tiny_config,
                                                                   caplog):
    from training.cli import main
    from training.fit import fit

    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match="no space left on"):
        fit(tiny_config(single_data, out, epochs=3),
            on_epoch_end=lambda epoch, row: _disk_full(monkeypatch))
    monkeypatch.undo()
    checkpoint.verify_weights(out)
    card = checkpoint.read_card(out)
    assert card.metrics["epoch"] == 1
    assert load_state(out / "last.pt")["progress"]["epoch"] == 1
    assert _leftovers(tmp_path) == [] and _leftovers(out) == []

    _disk_full(monkeypatch)
    code = main(["fit", str(single_data), "--output", str(tmp_path / "other"), "--weights",
                 "none", "--workers", "0", "--no-progress"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 1 and len(errors) == 1 and errors[0].startswith("no space left on ")
    assert _leftovers(tmp_path / "other") == []


def test_without_an_atomic_exchange_a_save_is_two_renames_and_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(models.atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "m"
    checkpoint.save(target, _net(0), _card(v=0))
    checkpoint.save(target, _net(1), _card(v=1))
    assert checkpoint.read_card(target).metrics == {"v": 1} and _leftovers(tmp_path) == []
    (target / "history.csv").write_text("epoch\n1\n")
    target.rename(tmp_path / ".m.old")  # as a kill between the two renames leaves it
    checkpoint.save(target, _net(0), _card(v=0))  # puts the old unit back, then replaces it
    assert checkpoint.read_card(target).metrics == {"v": 0} and _leftovers(tmp_path) == []
    assert (target / "history.csv").read_text() == "epoch\n1\n"
