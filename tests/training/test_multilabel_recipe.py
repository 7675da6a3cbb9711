"""Multi-label runs take no random crop by default; single-label defaults do not move."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import checkpoint
from models.device import Accelerator
from training.cli import build_parser
from training.config import TrainConfig
from training.context import RunContext
from training.data.load import load_data
from training.distributed import DistInfo
from training.exceptions import ConfigError
from training.fit import FitRun
from training.loop.train import build_criterion
from training.options import from_args
from training.recipe import resolve

# What a from-scratch single-label run at 32 px for 5 epochs resolved to before multi-label
# runs had defaults of their own, plus the two values that were fixed then (flip on, no
# pos_weight): none of it may move.
SINGLE_LABEL_SCRATCH_32PX_5_EPOCHS = {
    "stem": "small_stride2", "batch_size": 32, "lr": 2e-3, "backbone_lr_scale": 1.0,
    "weight_decay": 0.05, "warmup_epochs": 0.5, "label_smoothing": 0.1, "min_scale": 0.8,
    "hflip": True, "pos_weight": None, "trivial_augment": 0.0, "eval_resize_ratio": 1.0,
    # named when the optimizer, schedule, crop and normalisation became options: what was
    # always done (AdamW, cosine, the random resized crop, ImageNet's mean/std)
    "optimizer": "adamw", "momentum": None, "schedule": "cosine", "warmup_until_error": None,
    "pad_crop": 0, "normalize": "imagenet", "accumulate": 1, "name": None,
}


def _cfg(data: str = "train", **kw: object) -> TrainConfig:
    return TrainConfig(data=Path(data), output=Path("o"), **kw)  # type: ignore[arg-type]


def test_single_label_recipe_is_unchanged():
    recipe = resolve(_cfg(weights="none", image_size=32, epochs=5))
    assert recipe.to_dict() == SINGLE_LABEL_SCRATCH_32PX_5_EPOCHS
    fine = resolve(_cfg(weights="imagenet", image_size=224, epochs=10))
    assert (fine.min_scale, fine.hflip, fine.pos_weight, fine.lr) == (0.08, True, None, 1e-3)


@pytest.mark.parametrize("cfg", [_cfg("labels.csv", weights="none", image_size=32, epochs=6),
                                 _cfg("folder", task="multi", weights="none", image_size=32),
                                 _cfg("labels.csv", weights="imagenet", image_size=224)])
def test_multi_label_runs_take_no_crop(cfg):
    recipe = resolve(cfg)
    assert recipe.min_scale == 1.0 and recipe.pos_weight == "balanced"
    single = resolve(_cfg("folder", weights=cfg.weights, image_size=cfg.image_size,
                          epochs=cfg.epochs))
    # flips, the cosine decay and the warm-up stay for fine-tuning only; everything else is
    # what a single-label run of the same kind gets
    assert recipe.hflip == cfg.pretrained
    differs = {k for k, v in recipe.to_dict().items() if single.to_dict()[k] != v}
    scratch_only = {"hflip", "schedule", "warmup_epochs"}  # flips, cosine and warm-up stay
    assert differs == {"min_scale", "pos_weight"} | (scratch_only if not cfg.pretrained
                                                      else set())
    if not cfg.pretrained:
        assert (recipe.schedule, recipe.warmup_epochs) == ("constant", 0.0)


def test_values_the_user_sets_win_over_the_multi_label_defaults():
    recipe = resolve(_cfg("labels.csv", weights="none", image_size=32, min_scale=0.5,
                          hflip=False, pos_weight="none", lr=1e-3))
    assert (recipe.min_scale, recipe.hflip, recipe.pos_weight, recipe.lr) == \
        (0.5, False, "none", 1e-3)
    parsed = build_parser().parse_args(["fit", "labels.csv", "--output", "o", "--no-hflip",
                                        "--pos-weight", "none"])
    cfg = from_args(TrainConfig, parsed)
    assert (cfg.hflip, cfg.pos_weight) == (False, "none")
    unset = from_args(TrainConfig, build_parser().parse_args(["fit", "d", "--output", "o"]))
    assert (unset.hflip, unset.pos_weight) == (None, None)


def test_pos_weight_is_refused_for_single_label_and_unknown_values():
    with pytest.raises(ConfigError, match="--pos-weight applies to multi-label data only"):
        _cfg(task="single", pos_weight="balanced")
    with pytest.raises(ConfigError, match="--pos-weight must be one of none, balanced"):
        _cfg("labels.csv", pos_weight="inverse")


def test_criterion_follows_the_recipe():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    plain = build_criterion("multi_label", label_smoothing=0.1, train_targets=targets,
                            pos_weight="none")
    weighted = build_criterion("multi_label", label_smoothing=0.1, train_targets=targets,
                               pos_weight="balanced")
    assert isinstance(plain, nn.BCEWithLogitsLoss) and plain.pos_weight is None
    assert weighted.pos_weight.tolist() == [3.0, 1.0]  # 3 negatives / 1 positive; 2 / 2


def _corner_marks(path: Path, size: int = 32) -> None:
    """A black square with a white 3x3 mark in each corner."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for y in (0, size - 3):
        for x in (0, size - 3):
            img[y:y + 3, x:x + 3] = 255
    Image.fromarray(img).save(path)


def test_multi_label_train_transform_keeps_every_object(tmp_path, tiny_config):
    (tmp_path / "images").mkdir()
    for i in range(4):
        _corner_marks(tmp_path / "images" / f"{i}.png")
    (tmp_path / "labels.csv").write_text(
        "image,labels\n" + "".join(f"images/{i}.png,a{' b' * (i % 2)}\n" for i in range(4)))
    cfg = tiny_config(tmp_path / "labels.csv", tmp_path / "out")
    (tmp_path / "out").mkdir()
    data = load_data(RunContext(cfg, resolve(cfg), DistInfo(), Accelerator.create("cpu", "fp32")))
    torch.manual_seed(0)
    for _ in range(30):
        image = data.train[0][0]
        assert image.shape == (3, 32, 32)
        corners = [image[:, y:y + 3, x:x + 3] for y in (0, 29) for x in (0, 29)]
        assert all(int(c.min()) == 255 for c in corners)


def test_tiny_multi_label_fit_uses_and_records_its_defaults(multi_data, tmp_path, tiny_config):
    out = tmp_path / "multi"
    run = FitRun(tiny_config(multi_data, out, epochs=1), DistInfo())
    targets = run.data.train.targets()
    expected = (len(targets) - targets.sum(0)) / targets.sum(0)
    torch.testing.assert_close(run.learner.criterion.pos_weight, expected.clamp(1.0, 100.0))
    metrics = run.run()
    recipe = checkpoint.read_card(out).training["recipe"]
    assert (recipe["min_scale"], recipe["pos_weight"], recipe["hflip"]) == \
        (1.0, "balanced", False)
    assert 0.0 <= metrics["mAP"] <= 1.0
