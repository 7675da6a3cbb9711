"""Metric arithmetic and the recipe's size- and length-aware defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.loop.metrics import (
    average_precision,
    cross_fitted_thresholds,
    held_out_multi_label_metrics,
    multi_label_metrics,
    single_label_metrics,
    tune_thresholds,
)
from training.loop.schedule import build_scheduler
from training.loop.train import build_optimizer
from training.recipe import resolve


def test_single_label_metrics():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    target = np.array([0, 1, 1, 2])
    m = single_label_metrics(scores, target, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["support"] == 2
    assert m["top5_accuracy"] == 1.0
    assert m["confusion_matrix"][1] == [1, 1, 0]


def test_average_precision_and_thresholds():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert average_precision(scores, np.array([True, False, True, False])) == \
        pytest.approx((1 + 2 / 3) / 2)
    s = np.array([[0.9, 0.2], [0.8, 0.1], [0.3, 0.7], [0.2, 0.6]])
    t = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=float)
    thresholds = tune_thresholds(s, t)
    assert 0.3 < thresholds[0] <= 0.8 and 0.6 < thresholds[1] <= 0.7
    m = multi_label_metrics(s, t, ["x", "y"], thresholds)
    assert m["f1_micro"] == 1.0 and m["mAP"] == 1.0


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(data=Path("d"), output=Path("o"), **kw)  # type: ignore[arg-type]


def test_recipe_scales_augmentation_with_size_and_length():
    fine = resolve(_cfg(weights="imagenet", image_size=224, epochs=10))
    scratch = resolve(_cfg(weights="none", image_size=32, epochs=5))
    assert fine.stem == "imagenet" and fine.min_scale == 0.08 and fine.trivial_augment == 1.0
    assert fine.backbone_lr_scale < 1.0 and fine.eval_resize_ratio > 1.0
    assert scratch.stem == "small_stride2" and scratch.min_scale >= 0.35
    assert scratch.batch_size == 32 and fine.batch_size == 64
    assert scratch.trivial_augment == 0.0 and scratch.backbone_lr_scale == 1.0
    longer = resolve(_cfg(weights="none", image_size=32, epochs=60))
    assert longer.trivial_augment == 1.0 and longer.min_scale < scratch.min_scale
    assert resolve(_cfg(weights="none", image_size=128, epochs=5)).stem == "imagenet"
    assert resolve(_cfg(weights="none", image_size=32, stem="small")).stem == "small"
    assert resolve(_cfg(weights="none", image_size=32, lr=0.1)).lr == 0.1


def test_optimizer_groups_and_schedule():
    from models.architectures import build

    model = build("resnet18", num_classes=3)
    recipe = resolve(_cfg(weights="imagenet", lr=1e-3))
    opt = build_optimizer(model, recipe, arch="resnet18")
    by = {(g["part"], g["weight_decay"] > 0): g for g in opt.param_groups}
    assert by[("head", True)]["lr"] == pytest.approx(1e-3)
    assert by[("backbone", True)]["lr"] == pytest.approx(1e-4)
    assert all(p.ndim == 1 for p in by[("backbone", False)]["params"])  # norms and biases
    sched = build_scheduler(opt, dataclasses.replace(recipe, warmup_epochs=2.0),
                            steps_per_epoch=1, epochs=10, freeze_epochs=3)
    lrs = []
    for _ in range(10):
        lrs.append({g["part"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    assert lrs[0]["backbone"] == 0.0 and lrs[2]["backbone"] == 0.0 and lrs[3]["backbone"] > 0
    assert lrs[1]["head"] == pytest.approx(1e-3) and lrs[9]["head"] < lrs[3]["head"]
    assert torch.is_tensor(model.fc.weight)


def test_multi_label_f1_is_scored_on_images_the_thresholds_were_not_tuned_on():
    rng = np.random.default_rng(0)
    scores = rng.random((60, 3))  # scores that carry no information about the labels
    targets = (rng.random((60, 3)) < 0.3).astype(float)
    classes = ["a", "b", "c"]
    metrics, thresholds = held_out_multi_label_metrics(scores, targets, classes)
    assert thresholds == tune_thresholds(scores, targets)  # what the card ships
    in_sample = multi_label_metrics(scores, targets, classes, thresholds)
    held_out = multi_label_metrics(scores, targets, classes, thresholds,
                                   decide_with=cross_fitted_thresholds(scores, targets))
    assert metrics["f1_micro"] == held_out["f1_micro"] < in_sample["f1_micro"]
    assert metrics["f1_macro"] == held_out["f1_macro"]
    assert metrics["mAP"] == in_sample["mAP"]  # ranking figures need no threshold
    assert metrics["per_class"]["a"]["threshold"] == thresholds[0]
    assert "cross-fitted" in metrics["f1_thresholds"]
    cut = cross_fitted_thresholds(scores, targets)
    first_half = cut[:, 0] == cut[0, 0]
    assert 0 < first_half.sum() < 60  # two folds, each with its own thresholds
