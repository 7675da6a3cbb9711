"""The resume identity is derived, not kept by hand: the options marked `identity=True` on
TrainConfig and every value of the resolved recipe. A state saved under another value of any
of them is refused, naming the flag; the options not marked may change between the parts."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from models.device import Accelerator
from training.config import TrainConfig
from training.context import RunContext
from training.distributed import DistInfo
from training.exceptions import ResumeError
from training.loop.state import check_fits_run, run_identity
from training.options import flag_of, identity_fields
from training.recipe import Recipe, resolve

SPLIT = {"sha256": "0" * 64, "train": 8, "val": 2, "source": "a new split (seed 0)"}
CLASSES = ["a", "b"]
# Another valid value for each marked option (the task: another one found in the data).
CHANGED = {"val": Path("elsewhere"), "val_fraction": 0.3, "arch": "resnet34",
           "weights": "imagenet", "image_size": 48, "epochs": 3, "freeze_epochs": 1,
           "balance": "none", "seed": 1, "max_pixels": 1000}
# Options that are neither marked nor resolved into the recipe: free to change on resume.
FREE = {"device": "cpu", "workers": 3, "amp": False, "patience": 2, "progress": False,
        "decode_seconds": 5.0, "decode_memory_mb": 256, "overwrite": True}


def _identity(task: str = "single_label", **options: object) -> dict:
    values: dict[str, object] = {"data": Path("d"), "output": Path("o"), "arch": "resnet18",
                                 "weights": "none", "image_size": 32, "epochs": 2}
    values.update(options)
    cfg = TrainConfig(**values)  # type: ignore[arg-type]
    run = RunContext(cfg, resolve(cfg), DistInfo(), Accelerator.create("cpu", "fp32"))
    return run_identity(run, SimpleNamespace(task=task, split=SPLIT))


def _state() -> dict:
    return {"arch": "resnet18", "classes": CLASSES, "identity": _identity()}


def test_the_identity_is_the_marked_options_and_the_recipe():
    options = _identity()["options"]
    assert set(options) == set(identity_fields(TrainConfig)) | {f.name for f in fields(Recipe)}
    assert set(CHANGED) | {"task"} == set(identity_fields(TrainConfig))


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_marked_option_refuses_a_state_saved_under_another_value(name):
    with pytest.raises(ResumeError, match="saved with other options") as err:
        check_fits_run(Path("last.pt"), _state(), arch="resnet18", classes=CLASSES,
                       identity=_identity(**{name: CHANGED[name]}))
    assert flag_of(TrainConfig, name) in str(err.value)


def test_the_task_found_in_the_data_is_part_of_the_identity():
    with pytest.raises(ResumeError, match="--task 'single_label' -> 'multi_label'"):
        check_fits_run(Path("last.pt"), _state(), arch="resnet18", classes=CLASSES,
                       identity=_identity(task="multi_label"))


@pytest.mark.parametrize(("name", "value"), sorted(FREE.items()))
def test_options_not_marked_may_change(name, value):
    assert name not in identity_fields(TrainConfig)
    check_fits_run(Path("last.pt"), _state(), arch="resnet18", classes=CLASSES,
                   identity=_identity(**{name: value}))
