"""--balance (loss weights, balanced sampler), the imbalance warning and balanced accuracy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint
from tests.torchrun_helpers import torchrun_fit
from training.cli import main
from training.commands.synth import generate
from training.config import SynthConfig, TrainConfig
from training.data.balance import (
    BalancedSampler,
    class_counts,
    class_weights,
    resolve_balance,
    warn_if_imbalanced,
)
from training.distributed import DistInfo
from training.exceptions import ConfigError
from training.fit import FitRun
from training.loop.metrics import single_label_metrics

WARNING = "imbalanced classes"


def imbalanced_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """A class-folder tree of 32 px shapes with `counts[name]` images per class."""
    generate(SynthConfig(out=root, task="single", size=32, per_class=max(counts.values()),
                         classes=len(counts), seed=seed))
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for folder, keep in zip(folders, counts.values(), strict=True):
        for extra in sorted(folder.iterdir())[keep:]:
            extra.unlink()
        folder.rename(root / f"_{folder.name}")
    for folder, name in zip(sorted(root.iterdir()), counts, strict=True):
        folder.rename(root / name)
    return root


def test_sampler_draws_classes_equally_from_a_ten_to_one_set():
    targets = torch.tensor([0] * 1000 + [1] * 100)
    sampler = BalancedSampler(targets, 2, seed=3)
    assert len(sampler) == len(targets)
    drawn = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        drawn.append(torch.tensor(list(sampler)))
    minority = torch.stack([(targets[d] == 1).float().mean() for d in drawn])
    # 1100 draws per epoch: the standard deviation of the share is 0.015; 5 of them is 0.075.
    assert torch.all((minority - 0.5).abs() < 0.075), minority
    assert not torch.equal(drawn[0], drawn[1])  # each epoch draws afresh
    sampler.set_epoch(0)
    assert torch.equal(torch.tensor(list(sampler)), drawn[0])  # and reproducibly


def test_sampler_ranks_share_one_draw_without_overlap():
    targets = torch.tensor([0] * 30 + [1] * 3)
    ranks = [BalancedSampler(targets, 2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r) for r in ranks] == [17, 17]  # 33 images, padded to 34 draws
    first, second = list(ranks[0]), list(ranks[1])
    assert len(first) == len(second) == 17
    interleaved = [i for pair in zip(first, second, strict=True) for i in pair]
    full = BalancedSampler(targets, 2, seed=1, world_size=2)
    assert interleaved == torch.multinomial(full.weights, 34, replacement=True,
                                            generator=torch.Generator().manual_seed(1)).tolist()


def test_loss_weights_are_normalised_inverse_frequencies():
    counts = class_counts(torch.tensor([0] * 10 + [1] * 5 + [2] * 1), 3)
    assert counts.tolist() == [10, 5, 1]
    weights = class_weights(counts)
    inverse = np.array([1 / 10, 1 / 5, 1.0])
    np.testing.assert_allclose(weights.numpy(), inverse / inverse.mean(), rtol=1e-6)
    assert weights.mean().item() == pytest.approx(1.0)


def test_balanced_accuracy_and_per_class_recall_on_a_hand_made_example():
    target = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    scores = np.eye(4)[pred]  # a fourth class that no image has
    m = single_label_metrics(scores, target, ["a", "b", "c", "d"])
    assert m["per_class_recall"] == pytest.approx({"a": 0.75, "b": 0.5, "c": 1.0, "d": 0.0})
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)  # d is absent
    assert m["accuracy"] == pytest.approx(5 / 7)


def test_imbalance_warning_names_both_classes_at_six_to_one(tmp_path, caplog, tiny_config):
    train = imbalanced_folder(tmp_path / "train", {"big": 12, "small": 2})
    val = imbalanced_folder(tmp_path / "val", {"big": 2, "small": 2}, seed=1)
    with caplog.at_level(logging.WARNING, logger="training"):
        FitRun(tiny_config(train, tmp_path / "out", val=val), DistInfo())
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "'big' has 12" in warnings[0] and "'small' only 2" in warnings[0]
    assert "--balance" in warnings[0]


def test_no_imbalance_warning_at_two_to_one(tmp_path, caplog, tiny_config):
    train = imbalanced_folder(tmp_path / "train", {"big": 8, "small": 4})
    val = imbalanced_folder(tmp_path / "val", {"big": 2, "small": 2}, seed=1)
    with caplog.at_level(logging.WARNING, logger="training"):
        FitRun(tiny_config(train, tmp_path / "out", val=val), DistInfo())
        assert not warn_if_imbalanced(torch.tensor([10, 2]), ["a", "b"], balance="none")
    assert WARNING not in caplog.text
    assert warn_if_imbalanced(torch.tensor([11, 2]), ["a", "b"], balance="none")


@pytest.fixture(scope="module")
def skewed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes at 24 : 8 : 4 images."""
    return imbalanced_folder(tmp_path_factory.mktemp("skewed"),
                             {"circle": 24, "square": 8, "triangle": 4})


@pytest.mark.parametrize("balance", ["none", "loss", "sampler"])
def test_tiny_fit_with_each_balance_writes_the_new_metrics(balance, skewed_data, tmp_path,
                                                           caplog, tiny_config):
    out = tmp_path / balance
    run = FitRun(tiny_config(skewed_data, out, balance=balance), DistInfo())
    weight = run.learner.criterion.weight
    if balance == "loss":
        counts = class_counts(run.data.train.targets(), 3)
        torch.testing.assert_close(weight.cpu(), class_weights(counts))
        assert run.learner.criterion.label_smoothing == pytest.approx(0.1)
    else:
        assert weight is None
    assert isinstance(run.loaders.train_sampler, BalancedSampler) == (balance == "sampler")
    with caplog.at_level(logging.INFO, logger="training"):
        run.run()
    assert "val_balanced_accuracy" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert set(metrics["per_class_recall"]) == {"circle", "square", "triangle"}
    card = checkpoint.read_card(out)
    assert card.metrics["per_class_recall"] == metrics["per_class_recall"]
    assert card.metrics["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert card.training["config"]["balance"] == balance
    assert "val_balanced_accuracy" in (out / "history.csv").read_text().splitlines()[0]
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("best val")]
    recall = metrics["per_class_recall"]
    assert len(closing) == 1 and all(f"{name} {recall[name]:.3f}" in closing[0]
                                     for name in recall)
    assert f"balanced accuracy {metrics['balanced_accuracy']:.4f}" in closing[0]


def test_the_closing_line_lists_the_lowest_recalls_of_many_classes():
    from training.loop.metrics import recall_summary

    recall = {f"c{i:02d}": i / 30 for i in range(30)}
    line = recall_summary({"per_class_recall": recall, "balanced_accuracy": 0.48}, shown=5)
    assert "(lowest 5 of 30)" in line and "c00 0.000" in line and "c04 0.133" in line
    assert "c05" not in line
    assert recall_summary({"mAP": 0.5}) == ""


def test_auto_balance_samples_imbalanced_data_and_leaves_the_rest(skewed_data, multi_data,
                                                                  tmp_path, caplog, tiny_config):
    with caplog.at_level(logging.WARNING, logger="training"):
        skewed = FitRun(tiny_config(skewed_data, tmp_path / "skewed"), DistInfo())
    assert skewed.ctx.cfg.balance == "auto" and skewed.data.balance == "sampler"
    assert isinstance(skewed.loaders.train_sampler, BalancedSampler)
    assert "--balance auto draws every class equally often" in caplog.text
    train = imbalanced_folder(tmp_path / "even", {"big": 8, "small": 4})
    even = FitRun(tiny_config(train, tmp_path / "even-out"), DistInfo())
    assert even.data.balance == "none"
    assert not isinstance(even.loaders.train_sampler, BalancedSampler)
    multi = FitRun(tiny_config(multi_data, tmp_path / "multi"), DistInfo())
    assert multi.data.balance == "none"
    assert resolve_balance("loss", torch.tensor([30, 2]), "single_label") == "loss"
    assert resolve_balance("auto", torch.tensor([30, 6]), "single_label") == "none"
    assert resolve_balance("auto", torch.tensor([31, 6]), "single_label") == "sampler"


def test_multi_label_with_balance_is_refused(multi_data, tmp_path, caplog, tiny_config):
    with pytest.raises(ConfigError, match="single-label data only"):
        FitRun(tiny_config(multi_data, tmp_path / "o", balance="loss"), DistInfo())
    with pytest.raises(ConfigError, match="single-label data only"):
        TrainConfig(data=multi_data, output=tmp_path / "o2", task="multi", balance="sampler")
    code = main(["fit", str(multi_data), "--output", str(tmp_path / "o3"), "--balance",
                 "sampler", "--weights", "none", "--arch", "resnet18", "--workers", "0"])
    assert code == 1 and "single-label data only" in caplog.text
    assert not (tmp_path / "o3" / "card.json").exists()


def test_torchrun_two_processes_with_the_balanced_sampler(skewed_data, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_fit(skewed_data, out, "--balance", "sampler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(WARNING) == 1  # one rank warns
    metrics = json.loads((out / "metrics.json").read_text())
    assert checkpoint.read_card(out).training["world_size"] == 2
    assert set(metrics["per_class_recall"]) == {"circle", "square", "triangle"}
    shutil.rmtree(out)
