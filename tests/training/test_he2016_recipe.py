"""`--recipe he2016-cifar`: the values it resolves, its pad-and-crop, the training set's own
normalisation, and a short real run of the recipe on real photographs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import checkpoint
from models.architectures import OWN_STEM
from models.card import Preprocessing
from models.preprocessing import train_transform
from training.config import TrainConfig
from training.distributed import DistInfo
from training.exceptions import ConfigError
from training.loop.schedule import ERROR_WARMUP_MAX_SHARE, ERROR_WINDOW, schedule_multiplier
from training.recipe import resolve


def _cfg(**kw: object) -> TrainConfig:
    values: dict[str, object] = {"data": Path("folder"), "output": Path("o"),
                                 "arch": "resnet32", "weights": "none", "image_size": 32,
                                 "recipe_name": "he2016-cifar"}
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_the_paper_values_and_options_given_still_win():
    recipe = resolve(_cfg(epochs=182))
    assert recipe.to_dict() == {
        "stem": OWN_STEM, "batch_size": 128, "lr": 0.1, "backbone_lr_scale": 1.0,
        "weight_decay": 1e-4, "warmup_epochs": 0.0, "label_smoothing": 0.0, "min_scale": 1.0,
        "hflip": True, "pos_weight": None, "trivial_augment": 0.0, "eval_resize_ratio": 1.0,
        "optimizer": "sgd", "momentum": 0.9, "schedule": "step", "warmup_until_error": None,
        "pad_crop": 4, "normalize": "dataset", "accumulate": 1, "name": "he2016-cifar",
    }
    assert resolve(_cfg(arch="resnet110")).warmup_until_error == 0.8
    assert resolve(_cfg(arch="resnet110b")).warmup_until_error == 0.8
    mine = resolve(_cfg(lr=0.05, batch_size=64, schedule="cosine", momentum=0.5))
    assert (mine.lr, mine.batch_size, mine.schedule, mine.momentum) == (0.05, 64, "cosine", 0.5)
    assert resolve(_cfg(arch="resnet110", warmup_until_error=0.5)).warmup_until_error == 0.5


@pytest.mark.parametrize(("overrides", "message"), [
    ({"arch": "resnet18", "weights": "imagenet"}, "trains from scratch"),
    ({"pad_crop": 4, "min_scale": 0.5}, "--min-scale does not apply"),
    ({"recipe_name": None, "optimizer": "adamw", "momentum": 0.9}, "--momentum applies"),
    ({"task": "multi", "warmup_until_error": 0.8}, "single-label data only"),
    ({"recipe_name": "he2015"}, "--recipe must be one of"),
    ({"schedule": "linear"}, "--schedule must be one of"),
])
def test_options_that_cannot_go_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**overrides)


def test_pad_crop_is_a_window_of_the_padded_image():
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 255, (32, 32, 3), dtype=np.uint8)  # no black pixel of its own
    transform = train_transform(Preprocessing.for_crop(32, ratio=1.0), hflip=False,
                                trivial_augment=False, pad_crop=4)
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = pixels
    offsets = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = transform(Image.fromarray(pixels)).permute(1, 2, 0).numpy()
        assert out.shape == (32, 32, 3)
        found = [(y, x) for y in range(9) for x in range(9)
                 if np.array_equal(padded[y:y + 32, x:x + 32], out)]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # random windows, not one fixed crop


def _photo_classes(root: Path, per_class: int = 40) -> Path:
    """Three classes of real photographs (scikit-image's), 32 px crops of each."""
    from skimage import data

    rng = np.random.default_rng(1)
    for name in ("astronaut", "coffee", "chelsea"):
        photo = getattr(data, name)()
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(64, 160))
            y = int(rng.integers(0, photo.shape[0] - side))
            x = int(rng.integers(0, photo.shape[1] - side))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((32, 32))
            crop.save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _photo_classes(tmp_path_factory.mktemp("photos"))


def test_the_recipe_trains_a_cifar_resnet_on_real_photographs(tmp_path: Path, photos: Path,
                                                              tiny_config) -> None:
    from training.fit import FitRun

    out = tmp_path / "he"
    epochs = 4
    run = FitRun(tiny_config(photos, out, arch="resnet20", recipe_name="he2016-cifar",
                             epochs=epochs, batch_size=32), DistInfo())
    assert isinstance(run.learner.optimizer, torch.optim.SGD)
    assert run.learner.optimizer.param_groups[0]["momentum"] == 0.9
    run.run()
    _, card = checkpoint.load(out)

    # the normalisation is the training images' own, measured as the eval transform shows them
    pixels = np.stack([np.asarray(Image.open(s.path).convert("RGB"), dtype=np.float64) / 255
                       for s in run.data.train.samples])
    np.testing.assert_allclose(card.preprocessing.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(card.preprocessing.std, pixels.std(axis=(0, 1, 2)), atol=1e-5)
    assert (card.preprocessing.resize, card.preprocessing.crop) == (32, 32)  # one 32 px view
    assert card.training["recipe"]["name"] == "he2016-cifar"

    # the LR steps down by 10 at 50% and 75% of the optimizer steps
    with (out / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    steps = len(run.loaders.train)
    expected = [0.1 * schedule_multiplier("step", (e + 1) * steps, total_steps=epochs * steps,
                                          warmup_steps=0) for e in range(epochs)]
    assert [float(r["lr"]) for r in history] == pytest.approx(expected)
    assert [float(r["lr"]) for r in history] == pytest.approx([0.1, 0.01, 0.001, 0.001])
    # it learnt: better than the one-in-three of chance, in training and on validation
    assert float(history[-1]["train_accuracy"]) > 0.5
    assert card.metrics["accuracy"] > 0.5


def test_the_error_driven_warm_up_ends_when_the_training_error_drops(
        tmp_path: Path, photos: Path, tiny_config) -> None:
    from training.fit import FitRun

    run = FitRun(tiny_config(photos, tmp_path / "warm", arch="resnet20",
                             recipe_name="he2016-cifar", warmup_until_error=0.99, epochs=5,
                             batch_size=2), DistInfo())
    assert run.learner.scheduler.wants_error
    assert run.learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # lr / 10 to begin
    cap = round(ERROR_WARMUP_MAX_SHARE * run.learner.scheduler.total_steps)
    assert cap > ERROR_WINDOW  # the run is long enough for the error, not the cap, to decide
    run.run()
    # three classes: the error over the first window is below 99%, so the warm-up ends as soon
    # as the window is full, and the LR goes back to the schedule's
    assert not run.learner.scheduler.wants_error
    assert run.learner.scheduler.error_warmup_ended_at == ERROR_WINDOW
    assert run.progress.history[0]["lr"] == pytest.approx(0.1)  # after the first epoch


def test_every_named_recipe_sets_options_that_exist():
    import dataclasses

    from training.recipe import PRESETS

    options = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, values in PRESETS.items():
        assert set(values) <= options, (name, set(values) - options)
        resolved = resolve(_cfg(recipe_name=name)).to_dict()
        assert {k: resolved[k] for k in values if k in resolved} == {
            k: v for k, v in values.items() if k in resolved}
