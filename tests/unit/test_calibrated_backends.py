"""Serving backends apply a card's temperature, identically in PyTorch and ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import Normalize

PRE = Preprocessing.for_crop(32)
CLASSES = ["cat", "dog", "fox"]
TEMPERATURES = {"single_label": 2.5, "multi_label": [0.5, 1.0, 3.0]}


def _model() -> torch.nn.Module:
    torch.manual_seed(5)
    return build("resnet18", num_classes=len(CLASSES)).eval()


def _card(task: str, calibrated: bool) -> ModelCard:
    calibration = {"temperature": TEMPERATURES[task], "ece_before": 0.3, "ece_after": 0.1,
                   "bins": 15} if calibrated else None
    return ModelCard(name="t", arch="resnet18", task=task, classes=CLASSES, preprocessing=PRE,
                     calibration=calibration)


def _batch(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n))


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(Normalize(PRE)(batch))


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_torch_backend_divides_by_the_card_temperature(task: str) -> None:
    model, batch = _model(), _batch(4)
    logits = _logits(model, batch)
    cpu = Accelerator.create("cpu", "fp32")
    plain = Predictor(model, _card(task, False), cpu).probabilities(batch)
    calibrated = Predictor(model, _card(task, True), cpu).probabilities(batch)
    t = torch.as_tensor(TEMPERATURES[task])
    expected = torch.softmax(logits / t, 1) if task == "single_label" \
        else torch.sigmoid(logits / t)
    unscaled = torch.softmax(logits, 1) if task == "single_label" else torch.sigmoid(logits)
    assert torch.allclose(calibrated, expected, atol=1e-5)
    assert torch.allclose(plain, unscaled, atol=1e-5)
    assert not torch.allclose(calibrated, plain, atol=1e-3)


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_onnxruntime_bakes_in_the_temperature(task: str) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, batch, card = _model(), _batch(5), _card(task, True)
    cpu = Accelerator.create("cpu", "fp32")
    reference = Predictor(model, card, cpu).probabilities(batch)
    onnx = Predictor(model, card, cpu, backend="onnxruntime", threads=1).probabilities(batch)
    assert torch.allclose(onnx, reference, atol=1e-5)
