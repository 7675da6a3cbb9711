"""The ONNX Runtime backend: same probabilities as PyTorch, clear refusals otherwise."""

from __future__ import annotations

import sys

import pytest
import torch
from pydantic import ValidationError

from app.config import Settings
from models import onnx_backend
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.device import Accelerator
from models.onnx_backend import BackendError, OnnxRuntimeModel
from models.predict import Predictor

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

PRE = Preprocessing.for_crop(32)
CLASSES = ["cat", "dog", "fox"]


def _model_and_card(task: str = "single_label") -> tuple[torch.nn.Module, ModelCard]:
    torch.manual_seed(3)
    model = build("resnet18", num_classes=len(CLASSES))
    for m in model.modules():  # trained-looking statistics, so folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    card = ModelCard(name="t", arch="resnet18", task=task, classes=CLASSES, preprocessing=PRE,
                     thresholds=[0.5] * 3 if task == "multi_label" else None)
    return model, card


def _batch(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_onnxruntime_matches_torch(task: str) -> None:
    model, card = _model_and_card(task)
    cpu = Accelerator.create("cpu", "fp32")
    reference = Predictor(model, card, cpu)
    onnx = Predictor(model, card, cpu, backend="onnxruntime", threads=1)
    assert onnx.backend == "onnxruntime" and isinstance(onnx.run, OnnxRuntimeModel)
    for n in (1, 5):  # the exported graph takes any batch size
        batch = _batch(n)
        expected, got = reference.probabilities(batch), onnx.probabilities(batch)
        assert got.shape == (n, 3) and got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=1e-5)
    if task == "single_label":
        assert torch.allclose(got.sum(1), torch.ones(5), atol=1e-5)
    (result,) = onnx.postprocess(onnx.probabilities(_batch(1)), top_k=2)
    assert all(p.label in CLASSES for p in result.predictions)


def test_onnxruntime_refuses_cuda_or_reduced_precision() -> None:
    model, card = _model_and_card()
    with pytest.raises(BackendError, match="fp32 on the CPU"):
        Predictor(model, card, Accelerator(device=torch.device("cpu"), amp_dtype=torch.bfloat16),
                  backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor(model, card, Accelerator.create("cpu"), backend="tensorrt")


def test_outputs_that_differ_from_torch_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model, card = _model_and_card()
    monkeypatch.setattr(onnx_backend, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(BackendError, match="differ from PyTorch"):
        Predictor(model, card, Accelerator.create("cpu"), backend="onnxruntime")


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    model, card = _model_and_card()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendError, match=r"resnet-serve\[onnx\]"):
        Predictor(model, card, Accelerator.create("cpu"), backend="onnxruntime")


def test_settings_refuse_onnxruntime_on_cuda_or_bf16() -> None:
    with pytest.raises(ValidationError, match="backend onnxruntime"):
        Settings(backend="onnxruntime", precision="bf16")
    with pytest.raises(ValidationError, match="backend onnxruntime"):
        Settings(backend="onnxruntime", device="cuda")
    assert Settings(backend="onnxruntime").backend == "onnxruntime"
