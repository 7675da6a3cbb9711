"""A short run exports a checkpoint that loads back and behaves identically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import checkpoint
from models.calibration import expected_calibration_error
from models.outputs import probabilities
from models.preprocessing import Normalize, eval_transform
from training.commands.evaluate import build_eval_dataset, evaluate_checkpoint
from training.config import EvaluateConfig


def test_export_loads_back_with_identical_outputs(trained):
    run, out = trained
    model, card = checkpoint.load(out)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    norm = Normalize(card.preprocessing)
    live = run.learner.model.float().cpu().eval()
    with torch.no_grad():
        expected = live(norm(x).contiguous(memory_format=torch.channels_last))
        got = model(norm(x))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert card.classes == run.data.classes
    assert card.stem == "small_stride2"  # 32 px from scratch gets a small-image stem
    assert card.task == "single_label"


def test_card_records_the_run(trained):
    _, out = trained
    card = checkpoint.read_card(out)
    t = card.training
    assert t["dataset"]["train"] + t["dataset"]["val"] == 36
    assert t["epochs_run"] == 2 and t["seconds"] > 0
    assert t["config"]["arch"] == "resnet18" and t["recipe"]["stem"] == "small_stride2"
    assert set(t["versions"]) == {"torch", "torchvision"}
    assert "accuracy" in card.metrics and 0.0 <= card.metrics["accuracy"] <= 1.0
    assert (card.preprocessing.resize, card.preprocessing.crop) == (32, 32)
    for name in ("metrics.json", "history.csv", "curves.png", "confusion_matrix.png",
                 "split.json", "last.pt"):
        assert (out / name).is_file(), name
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,")


def test_eval_transform_is_the_cards(trained, single_data):
    run, out = trained
    card = checkpoint.read_card(out)
    dataset = build_eval_dataset(single_data, card)
    assert repr(dataset.transform) == repr(eval_transform(card.preprocessing))
    assert repr(run.data.val.transform) == repr(eval_transform(card.preprocessing))


def test_evaluate_prints_only_json_matching_a_manual_pass(trained, single_data):
    _, out = trained
    proc = subprocess.run(
        [sys.executable, "-m", "training", "evaluate", str(out), str(single_data),
         "--device", "cpu"], capture_output=True, text=True, check=True, timeout=120)
    metrics = json.loads(proc.stdout)
    assert set(metrics) >= {"accuracy", "top5_accuracy", "balanced_accuracy", "per_class"}
    assert metrics["num_samples"] == 36
    assert metrics["top5_accuracy"] == 1.0  # 3 classes
    assert set(metrics["per_class"]["circle"]) == {"precision", "recall", "f1", "support"}
    # The same numbers by hand: card transform, loaded model, argmax.
    model, card = checkpoint.load(out)
    ds = build_eval_dataset(single_data, card)
    norm = Normalize(card.preprocessing)
    correct, scores, targets = 0, [], []
    with torch.no_grad():
        for i in range(len(ds)):
            image, target, _ = ds[i]
            logits = model(norm(image[None]))
            correct += int(logits.argmax(1).item() == int(target))
            scores.append(probabilities(logits, card.task, card.temperature)[0].numpy())
            targets.append(int(target))
    assert metrics["accuracy"] == pytest.approx(correct / len(ds))
    # calibration error of the scores as served (the card's temperature applied)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(
        np.stack(scores), np.array(targets), card.task), abs=1e-6)


def test_evaluate_gives_the_confusion_matrix_only_when_asked(trained, single_data):
    _, out = trained
    plain = evaluate_checkpoint(EvaluateConfig(checkpoint=out, data=single_data, device="cpu"))
    asked = evaluate_checkpoint(EvaluateConfig(checkpoint=out, data=single_data, device="cpu",
                                               confusion_matrix=True))
    assert "confusion_matrix" not in plain
    matrix = asked["confusion_matrix"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) == plain["num_samples"] == 36


def test_corrupt_card_and_truncated_weights_are_named(trained, tmp_path):
    _, out = trained
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "card.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(broken)
    assert err.value.path.endswith("card.json") and "JSON" in err.value.problem

    shutil.copy(out / "card.json", broken / "card.json")
    data = (out / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(broken)
    assert err.value.path.endswith("model.safetensors")

    card = json.loads((out / "card.json").read_text())
    card["stem"] = "imagenet"  # weights of the small stem no longer fit
    (broken / "card.json").write_text(json.dumps(card))
    shutil.copy(out / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="wrong shapes"):
        checkpoint.load(broken)


def test_evaluate_excludes_a_bomb_and_a_broken_image_and_counts_them(trained, single_data,
                                                                     tmp_path):
    from tests.imagegen import png_bomb

    _, out = trained
    data = tmp_path / "data"
    shutil.copytree(single_data, data)
    (data / "circle" / "bomb.png").write_bytes(png_bomb())  # 400 MP in a few kB
    good = (data / "square" / "00000.png").read_bytes()
    (data / "square" / "cut.png").write_bytes(good[: len(good) // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "training", "evaluate", str(out), str(data), "--device", "cpu",
         "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["num_samples"] == 36 and metrics["excluded"] == 2
    assert {p.rsplit("/", 1)[-1] for p in metrics["excluded_images"]} == {"bomb.png", "cut.png"}
