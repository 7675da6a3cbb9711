"""Shared fixtures for training tests: tiny generated datasets and one trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.commands.synth import generate
from training.config import SynthConfig, TrainConfig


def tiny_config(data: Path, output: Path, **overrides: object) -> TrainConfig:
    """A fast from-scratch config: resnet18, 32 px, one epoch, no worker processes."""
    values: dict[str, object] = dict(data=data, output=output, arch="resnet18", weights="none",
                                     image_size=32, epochs=1, batch_size=16, workers=0,
                                     progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    """The `tiny_config` factory, for tests that build their own runs."""
    return tiny_config


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    # two at most; one where pytest-xdist runs a session per core beside this one
    sessions = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // sessions)))


@pytest.fixture(scope="session")
def single_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shape classes, 12 images each, 32 px."""
    return generate(SynthConfig(out=tmp_path_factory.mktemp("single"), task="single", size=32,
                                per_class=12, classes=3, seed=3))


@pytest.fixture(scope="session")
def multi_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label CSV over four shapes, 32 px."""
    return generate(SynthConfig(out=tmp_path_factory.mktemp("multi"), task="multi", size=32,
                                per_class=12, classes=4, seed=4))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, single_data: Path):
    """One short run on `single_data`: (FitRun after run(), output folder)."""
    from training.distributed import DistInfo
    from training.fit import FitRun

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    run = FitRun(tiny_config(single_data, out, epochs=2), DistInfo())
    run.run()
    return run, out
