"""The LR schedules, the error-driven warm-up, and gradient accumulation against the full batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.card import Preprocessing
from models.device import Accelerator
from models.preprocessing import Normalize, eval_transform
from training.config import TrainConfig
from training.context import RunContext
from training.data.datasets import ImageDataset, make_loader
from training.data.discovery import Sample
from training.distributed import DistInfo
from training.loop.schedule import (
    ERROR_WINDOW,
    FINAL_COSINE,
    LRSchedule,
    optimizer_steps,
    schedule_multiplier,
)
from training.loop.train import Learner, train_one_epoch
from training.recipe import resolve


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.zeros(2))]
    return torch.optim.SGD([{"params": params, "lr": lr, "part": "head"}], lr=lr)


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    factors = [schedule_multiplier("step", s, total_steps=100, warmup_steps=0)
               for s in range(100)]
    assert factors[:50] == [1.0] * 50
    assert factors[50:75] == pytest.approx([0.1] * 25)
    assert factors[75:] == pytest.approx([0.01] * 25)


def test_cosine_and_constant_after_a_linear_warm_up():
    cosine = [schedule_multiplier("cosine", s, total_steps=100, warmup_steps=10)
              for s in range(101)]
    assert cosine[0] == pytest.approx(0.01 + 0.99 / 10) and cosine[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:], strict=False))
    assert cosine[100] == pytest.approx(FINAL_COSINE)
    constant = [schedule_multiplier("constant", s, total_steps=100, warmup_steps=4)
                for s in range(100)]
    assert constant[4:] == [1.0] * 96 and constant[0] < 1.0


def test_error_warm_up_holds_lr_over_ten_until_the_error_is_low_enough():
    opt = _optimizer()
    schedule = LRSchedule(opt, kind="step", total_steps=1000, warmup_until_error=0.8)
    for _ in range(30):  # error 0.9: not below 0.8, the warm-up goes on
        schedule.observe_error(0.9)
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01) and schedule.wants_error
    # the mean over the last ERROR_WINDOW steps decides: three steps at 0.3 leave it at 0.81
    assert ERROR_WINDOW == 20
    for _ in range(3):
        schedule.observe_error(0.3)
        schedule.step()
    assert schedule.wants_error
    saved = schedule.state_dict()
    schedule.observe_error(0.3)  # a fourth: 0.78
    schedule.step()
    assert not schedule.wants_error and opt.param_groups[0]["lr"] == pytest.approx(0.1)

    resumed_opt = _optimizer()
    resumed = LRSchedule(resumed_opt, kind="step", total_steps=1000, warmup_until_error=0.8)
    resumed.load_state_dict(saved)  # stopped one step before the end of the warm-up
    assert resumed.wants_error and resumed_opt.param_groups[0]["lr"] == pytest.approx(0.01)
    resumed.observe_error(0.3)
    resumed.step()
    assert not resumed.wants_error and resumed.last_epoch == schedule.last_epoch


def test_error_warm_up_ends_after_a_tenth_of_the_run_whatever_the_error():
    opt = _optimizer()
    schedule = LRSchedule(opt, kind="constant", total_steps=200, warmup_until_error=0.8)
    for _ in range(19):
        schedule.observe_error(1.0)
        schedule.step()
    assert schedule.wants_error
    schedule.step()
    assert not schedule.wants_error and opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_an_older_lambda_schedule_state_resumes_at_its_step():
    opt = _optimizer()
    schedule = LRSchedule(opt, kind="step", total_steps=10)
    schedule.load_state_dict({"last_epoch": 6, "base_lrs": [0.1], "_step_count": 7,
                              "lr_lambdas": [None]})
    assert schedule.last_epoch == 6 and opt.param_groups[0]["lr"] == pytest.approx(0.01)


def _small_net() -> nn.Module:
    """No batch norm: its statistics are per micro-batch, so only a net without it can give
    exactly the full batch's gradient."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    """20 real photo crops (scikit-image's astronaut), three classes."""
    from skimage import data

    root = tmp_path_factory.mktemp("crops")
    photo = data.astronaut()
    samples = []
    rng = np.random.default_rng(0)
    for i in range(20):
        y, x = (int(v) for v in rng.integers(0, 400, 2))
        path = root / f"{i}.png"
        Image.fromarray(photo[y:y + 64, x:x + 64]).resize((16, 16)).save(path)
        samples.append(Sample(path, (["a", "b", "c"][i % 3],)))
    pre = Preprocessing.for_crop(16, ratio=1.0)
    return ImageDataset(samples, ["a", "b", "c"], "single_label", eval_transform(pre))


def _one_epoch(dataset: ImageDataset, *, batch_size: int, accumulate: int,
               optimizer_kind: str) -> tuple[nn.Module, LRSchedule]:
    net = _small_net()
    params = [{"params": list(net.parameters()), "lr": 0.05, "part": "head",
               "weight_decay": 0.0}]
    optimizer = (torch.optim.SGD(params, lr=0.05, momentum=0.9) if optimizer_kind == "sgd"
                 else torch.optim.AdamW(params, lr=0.05))
    loader = make_loader(dataset, batch_size=batch_size, workers=0, shuffle=False,
                         pin_memory=False)
    schedule = LRSchedule(optimizer, kind="constant",
                          total_steps=optimizer_steps(len(loader), accumulate))
    cfg = TrainConfig(data=Path("photos"), output=Path("out"), arch="resnet18", weights="none",
                      image_size=16, epochs=1, accumulate=accumulate, progress=False)
    run = RunContext(cfg, resolve(cfg), DistInfo(), Accelerator.create("cpu", "fp32"))
    learner = Learner(net, net, Normalize(Preprocessing.for_crop(16, ratio=1.0)),
                      nn.CrossEntropyLoss(), optimizer, schedule,
                      torch.amp.GradScaler("cpu", enabled=False))
    train_one_epoch(run, learner, loader, 0)
    return net, schedule


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
def test_accumulated_micro_batches_make_the_full_batch_update(photo_dataset, optimizer_kind):
    full, full_schedule = _one_epoch(photo_dataset, batch_size=20, accumulate=1,
                                     optimizer_kind=optimizer_kind)
    micro, micro_schedule = _one_epoch(photo_dataset, batch_size=5, accumulate=4,
                                       optimizer_kind=optimizer_kind)
    assert full_schedule.last_epoch == micro_schedule.last_epoch == 1  # one optimizer step
    untouched = _small_net()
    for a, b, start in zip(full.parameters(), micro.parameters(), untouched.parameters(),
                           strict=True):
        assert not torch.equal(a, start)  # the step did move the weights
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_short_last_group_is_the_mean_of_its_own_micro_batches(photo_dataset):
    # 20 images in micro-batches of 4 with accumulate 3: groups of 12 and 8 images; the
    # same as two full steps of 12 and 8
    full, full_schedule = _one_epoch(photo_dataset, batch_size=4, accumulate=1,
                                     optimizer_kind="sgd")
    assert full_schedule.last_epoch == 5
    grouped, schedule = _one_epoch(photo_dataset, batch_size=4, accumulate=3,
                                   optimizer_kind="sgd")
    assert schedule.last_epoch == optimizer_steps(5, 3) == 2 == math.ceil(5 / 3)
    reference = _small_net()
    optimizer = torch.optim.SGD([{"params": list(reference.parameters()), "lr": 0.05}],
                                lr=0.05, momentum=0.9)
    normalize = Normalize(Preprocessing.for_crop(16, ratio=1.0))
    images = torch.stack([photo_dataset[i][0] for i in range(20)])
    targets = torch.stack([photo_dataset[i][1] for i in range(20)])
    for group in (slice(0, 12), slice(12, 20)):
        optimizer.zero_grad()
        nn.CrossEntropyLoss()(reference(normalize(images[group])), targets[group]).backward()
        optimizer.step()
    for a, b in zip(grouped.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fit_with_accumulation_steps_once_per_group(tmp_path: Path, single_data: Path,
                                                    tiny_config) -> None:
    from training.fit import FitRun

    run = FitRun(tiny_config(single_data, tmp_path / "acc", batch_size=4, accumulate=3,
                             epochs=1), DistInfo())
    run.run()
    micro = len(run.loaders.train)
    assert run.learner.scheduler.last_epoch == optimizer_steps(micro, 3) < micro
    assert run.ctx.recipe.effective_batch_size == 12
    assert run.ctx.recipe.to_dict()["accumulate"] == 3
