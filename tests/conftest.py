"""Shared fixtures: tiny real checkpoints trained once per session; the slow lane's marks."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.preprocessing import Normalize, eval_transform
from tests.serving_helpers import CLASSES, CROP, MULTI_THRESHOLDS, color_image

# what `make test-fast` leaves out: fits and real server processes (a file elsewhere that
# trains or starts processes marks itself with `pytestmark = pytest.mark.slow`)
SLOW_FOLDERS = ("e2e", "training")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e and tests/training as slow."""
    for item in items:
        if item.path.is_relative_to(TESTS) \
                and item.path.relative_to(TESTS).parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


def _train_color_model(pre: Preprocessing) -> torch.nn.Module:
    torch.manual_seed(0)
    transform, normalize = eval_transform(pre), Normalize(pre)
    images, labels = [], []
    for seed in range(16):
        for idx, name in enumerate(CLASSES):
            images.append(transform(color_image(name, seed=1000 + seed)))
            labels.append(idx)
    x = normalize(torch.stack(images))
    y = torch.tensor(labels)
    model = build("resnet18", num_classes=len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(40):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(step))[:24]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        test = normalize(torch.stack([transform(color_image(n, seed=7)) for n in CLASSES]))
        predicted = model(test).argmax(1).tolist()
    assert predicted == [0, 1, 2], f"the tiny fixture model did not learn: {predicted}"
    return model


@pytest.fixture(scope="session")
def trained_model() -> tuple[torch.nn.Module, Preprocessing]:
    """A resnet18 at 32 px that tells red, green and blue images apart (trained in seconds)."""
    pre = Preprocessing(resize=CROP, crop=CROP)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than contended ones
    try:
        return _train_color_model(pre), pre
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory,
                    trained_model: tuple[torch.nn.Module, Preprocessing]) -> Path:
    """A checkpoint folder with `colors` (single-label) and `tags` (multi-label, tuned
    per-class thresholds), both real checkpoints written by models.checkpoint.save."""
    model, pre = trained_model
    root = tmp_path_factory.mktemp("checkpoints")
    checkpoint.save(root / "colors", model, ModelCard(
        name="colors", arch="resnet18", task="single_label", classes=CLASSES,
        preprocessing=pre, metrics={"accuracy": 1.0}))
    checkpoint.save(root / "tags", model, ModelCard(
        name="tags", arch="resnet18", task="multi_label", classes=CLASSES,
        preprocessing=pre, thresholds=MULTI_THRESHOLDS))
    return root


@pytest.fixture
def make_checkpoint_dir(tmp_path: Path, checkpoint_root: Path
                        ) -> Callable[..., Path]:
    """Build a fresh checkpoint folder holding copies of the named session checkpoints."""

    def make(*names: str, broken: dict[str, dict[str, bytes]] | None = None) -> Path:
        root = tmp_path / "ckpts"
        root.mkdir(exist_ok=True)
        for name in names:
            shutil.copytree(checkpoint_root / name, root / name)
        for name, files in (broken or {}).items():
            (root / name).mkdir()
            for filename, data in files.items():
                (root / name / filename).write_bytes(data)
        return root

    return make
