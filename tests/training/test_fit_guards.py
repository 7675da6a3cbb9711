"""`fit` never exports a silently wrong model and never loses a checkpoint it should keep."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models import checkpoint
from models.architectures import build
from training.cli import main
from training.commands.synth import generate
from training.config import SynthConfig
from training.data.discovery import discover
from training.data.split import split_payload, stratified_split
from training.exceptions import DataError, NonFiniteError, OutputError, ResumeError
from training.fit import fit
from training.loop.state import rank_rng


def _truncated(path: Path, colour: tuple[int, int, int] = (90, 90, 90)) -> Path:
    """A PNG whose header reads fine but whose pixel data is cut short."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((32, 32), 60).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _copy(trained_out: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained_out, out)
    return out


def test_refit_into_a_checkpoint_needs_overwrite(trained, single_data, tmp_path, tiny_config):
    out = _copy(trained[1], tmp_path)
    card_before = (out / "card.json").read_bytes()
    with pytest.raises(OutputError, match="already holds a checkpoint.*--overwrite"):
        fit(tiny_config(single_data, out))
    assert (out / "card.json").read_bytes() == card_before
    fit(tiny_config(single_data, out, overwrite=True, seed=1))
    assert checkpoint.read_card(out).training["config"]["seed"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["progress"]["epoch"] == 1


@pytest.mark.parametrize(("change", "says"), [
    ({"lr": 0.01}, "--lr 0.002 -> 0.01"),
    ({"batch_size": 8}, "--batch-size 16 -> 8"),
    ({"image_size": 48}, "--image-size 32 -> 48"),
    ({"stem": "small"}, "--stem 'small_stride2' -> 'small'"),
])
def test_resume_refuses_changed_options(trained, single_data, tiny_config, change, says):
    _, out = trained
    with pytest.raises(ResumeError, match="saved with other options") as err:
        fit(tiny_config(single_data, out, epochs=2, resume=out / "last.pt", **change))
    assert says in str(err.value)


def test_resume_refuses_a_state_of_another_split(trained, single_data, tmp_path, tiny_config):
    out = _copy(trained[1], tmp_path)
    found = discover(single_data)
    train, val = stratified_split(found.samples, fraction=0.2, seed=5)
    (out / "split.json").write_text(split_payload(found.root, train, val, seed=5,
                                                  fraction=0.2))
    with pytest.raises(ResumeError, match="saved for another train/validation split"):
        fit(tiny_config(single_data, out, epochs=2, resume=out / "last.pt"))
    state = torch.load(out / "last.pt", weights_only=True)
    del state["identity"]
    torch.save(state, out / "old.pt")
    with pytest.raises(ResumeError, match="records neither the options nor the split"):
        fit(tiny_config(single_data, out, epochs=2, resume=out / "old.pt"))


def test_undecodable_images_are_left_out_and_counted(tmp_path, tiny_config):
    data = generate(SynthConfig(out=tmp_path / "train", size=32, per_class=6, classes=3, seed=1))
    val = generate(SynthConfig(out=tmp_path / "val", size=32, per_class=2, classes=3, seed=2))
    _truncated(data / "circle" / "broken.png")
    _truncated(val / "square" / "broken.png")
    out = tmp_path / "out"
    metrics = fit(tiny_config(data, out, val=val))
    assert metrics["num_samples"] == 6 and metrics["excluded"] == 1
    assert sum(c["support"] for c in metrics["per_class"].values()) == 6
    skipped = checkpoint.read_card(out).training["dataset"]["skipped"]
    assert skipped["train_undecodable"] == 1 and skipped["val_undecodable"] == 1
    assert {"circle/broken.png", "../val/square/broken.png"} <= set(skipped["examples"])


def test_a_class_that_never_decodes_stops_the_run(tmp_path, tiny_config):
    data = generate(SynthConfig(out=tmp_path / "d", size=32, per_class=6, classes=2, seed=1))
    for i in range(6):
        _truncated(data / "ring" / f"{i}.png")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="class 'ring' has no decodable training image"):
        fit(tiny_config(data, out))
    assert not (out / "card.json").exists()


def test_nothing_decodable_with_worker_processes_is_one_line(tmp_path, caplog):
    for name in ("a", "b"):
        for i in range(3):
            _truncated(tmp_path / "d" / name / f"{i}.png")
    code = main(["fit", str(tmp_path / "d"), "--output", str(tmp_path / "out"), "--weights",
                 "none", "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
                 "--workers", "2", "--no-progress", "--device", "cpu"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 1 and len(errors) == 1
    assert "none of the 4 training images could be decoded" in errors[0]
    assert "Traceback" not in errors[0]


def test_a_diverging_run_stops_and_exports_nothing(single_data, tmp_path, tiny_config):
    torch.manual_seed(0)
    net = build("resnet18", num_classes=3)
    with torch.no_grad():
        net.fc.weight.fill_(3e38)  # finite, but logits overflow at the first step
        net.fc.weight[1].fill_(-3e38)
    weights = tmp_path / "diverged.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match="training loss became nan at epoch 1, step 1"):
        fit(tiny_config(single_data, out, weights=str(weights)))
    assert not (out / "card.json").exists() and not (out / "model.safetensors").exists()


def test_each_rank_gets_back_its_own_random_state():
    state = {"world_size": 2, "rng": [{"process": "rank 0"}, {"process": "rank 1"}]}
    assert rank_rng(state, 1, 2) == {"process": "rank 1"}
    assert rank_rng(state, 0, 2) == {"process": "rank 0"}
    assert rank_rng(state, 0, 4) is None  # another world size: fresh streams, not rank 0's
