"""What runs a model's batches: PyTorch on the chosen device, or ONNX Runtime on the CPU.

A runner takes a uint8 [N, 3, H, W] batch on the host and answers float32 [N, C] raw
logits on the host, then the unknown score where the model computes one (models.unknown);
the Predictor makes the served scores from them.
A new serving backend is its entry in models.backend_specs, naming the function that builds
its runner (in its own module, as models.onnx_backend is).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from models.backend_specs import backend_spec
from models.card import ModelCard
from models.device import Accelerator
from models.onnx_backend import BackendError
from models.preprocessing import Normalize

Runner = Callable[[torch.Tensor], torch.Tensor]


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


def torch_runner(model: nn.Module, card: ModelCard, accelerator: Accelerator,
                 threads: int) -> Runner:
    """The torch backend's runner (its entry in models.backend_specs names this)."""
    return TorchRunner(model, card, accelerator)


def make_runner(backend: str, model: nn.Module, card: ModelCard, accelerator: Accelerator, *,
                threads: int = 0) -> Runner:
    """The runner for `backend` (models.backend_specs), on `threads` threads where the
    runtime has a pool of its own (0: torch's thread count)."""
    spec = backend_spec(backend)
    conflict = spec.conflicts("cuda" if accelerator.is_cuda else "cpu",
                              "fp32" if accelerator.amp_dtype is None else "fp16")
    if conflict is not None:
        raise BackendError(f"{conflict} (got {accelerator.describe()}, "
                           f"{accelerator.precision_name})")
    module, function = spec.runner.split(":")
    build = getattr(importlib.import_module(module), function)
    return build(model, card, accelerator, threads)
