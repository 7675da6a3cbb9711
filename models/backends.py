"""What runs a model's batches: PyTorch on the chosen device, or ONNX Runtime on the CPU.

A runner takes a uint8 [N, 3, H, W] batch on the host and answers float32 [N, C] raw
logits on the host, then the unknown score where the model computes one (models.unknown);
the Predictor makes the served scores from them.
A new serving backend is one runner here (its own module for the heavy part, as
models.onnx_backend is) plus its name in models.backend_names.Backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.backend_names import BACKENDS
from models.card import ModelCard
from models.device import Accelerator
from models.onnx_backend import BackendError, OnnxRuntimeModel
from models.preprocessing import Normalize

Runner = Callable[[torch.Tensor], torch.Tensor]


def backend_device(backend: str, device: str) -> str:
    """The device to run `backend` on: ONNX Runtime always runs on the CPU."""
    return "cpu" if backend == "onnxruntime" else device


class TorchRunner:
    """The model in PyTorch: normalised on the device, channels_last, autocast on CUDA."""

    def __init__(self, model: nn.Module, card: ModelCard, accelerator: Accelerator) -> None:
        self.model = accelerator.prepare_model(model).eval()
        self.normalize = Normalize(card.preprocessing).to(accelerator.device)
        self.accelerator = accelerator

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 [N, C(+1)] outputs on the CPU."""
        x = self.normalize(self.accelerator.to_device(batch))
        if self.accelerator.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.accelerator.autocast():
            logits = self.model(x)
        return logits.float().cpu()


def make_runner(backend: str, model: nn.Module, card: ModelCard, accelerator: Accelerator, *,
                threads: int = 0) -> Runner:
    """The runner for `backend` ("torch" or "onnxruntime"; the latter CPU/fp32 only, on
    `threads` threads, 0 meaning torch's thread count)."""
    if backend == "torch":
        return TorchRunner(model, card, accelerator)
    if backend == "onnxruntime":
        if accelerator.is_cuda or accelerator.amp_dtype is not None:
            raise BackendError("the onnxruntime backend runs fp32 on the CPU; use "
                               f"device cpu and precision fp32 (got {accelerator.describe()}, "
                               f"{accelerator.precision_name})")
        return OnnxRuntimeModel(model.cpu().eval(), Normalize(card.preprocessing),
                                task=card.task, classes=card.num_classes,
                                input_shape=(3, card.preprocessing.crop, card.preprocessing.crop),
                                threads=threads or torch.get_num_threads())
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
