"""Run a checkpoint's model with ONNX Runtime on the CPU instead of PyTorch.

The model (batch norms folded, input normalisation included, up to the logits and, for a
card with an unknown-input rule, the unknown score) is exported to ONNX in memory when a
checkpoint loads, and checked against PyTorch on the same inputs
before it serves: a model whose outputs differ is refused. Scores are made from the logits
by the Predictor, as for every backend.

It exists because ONNX Runtime is faster than PyTorch on CPU hosts at small batches (figures
in docs/benchmarks.md). Needs the `onnx` extra: `pip install 'resnet-serve[onnx]'`.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from models.card import ModelCard
from models.device import Accelerator
from models.outputs import probabilities
from models.preprocessing import Normalize

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # largest probability difference to PyTorch accepted at load
LOGIT_TOLERANCE = 1e-3  # largest logit difference, relative to the logit (at least 1)


class BackendError(RuntimeError):
    """The ONNX Runtime backend cannot run this model (missing package, failed export,
    outputs that differ from PyTorch's)."""


class LogitGraph(nn.Module):
    """uint8 batch -> the runner's outputs: the model with its input normalisation."""

    def __init__(self, model: nn.Module, normalize: nn.Module) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def _import_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            f"the onnxruntime backend needs the onnx and onnxruntime packages ({exc}); "
            "install them with: pip install 'resnet-serve[onnx]'") from None
    return onnxruntime


def export_onnx(graph: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """`graph` (uint8 `images` [N, *input_shape] -> `logits`) as ONNX bytes, any batch size."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the TorchScript exporter suits a ResNet well
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, (torch.zeros((1, *input_shape), dtype=torch.uint8),), buffer,
                input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - reported as this backend's failure
        raise BackendError(f"cannot export the model to ONNX: {exc}") from exc
    return buffer.getvalue()


class OnnxRuntimeModel:
    """An ONNX Runtime session computing logits from uint8 NCHW batches."""

    def __init__(self, model: nn.Module, normalize: nn.Module, *, task: str, classes: int,
                 input_shape: tuple[int, int, int], threads: int) -> None:
        ort = _import_onnxruntime()
        self.task, self.classes = task, classes
        graph = LogitGraph(model, normalize).eval()
        exported = export_onnx(graph, input_shape)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle workers sleep instead of spinning: the decode threads and the event loop need
        # the cores between batches (measured in docs/benchmarks.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(exported, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"ONNX Runtime cannot load the exported model: {exc}") from exc
        self.version = ort.__version__
        self._check_parity(graph, input_shape)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] (CPU) -> float32 [N, C(+1)] logits (and unknown score)."""
        images = np.ascontiguousarray(batch.numpy())
        return torch.from_numpy(self.session.run(None, {"images": images})[0])

    def _check_parity(self, graph: nn.Module, input_shape: tuple[int, int, int]) -> None:
        generator = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 256, (2, *input_shape), dtype=torch.uint8,
                              generator=generator)
        with torch.inference_mode():
            expected = graph(probe)
        got = self(probe)
        if got.shape != expected.shape:
            raise BackendError(f"ONNX Runtime answered shape {list(got.shape)}, PyTorch "
                               f"{list(expected.shape)}; use the torch backend")
        c = self.classes
        diff = float((probabilities(got[:, :c], self.task)
                      - probabilities(expected[:, :c], self.task)).abs().max())
        logit_diff = float(((got - expected).abs() / expected.abs().clamp(min=1.0)).max())
        if not (diff <= PARITY_TOLERANCE and logit_diff <= LOGIT_TOLERANCE):
            raise BackendError(f"ONNX Runtime's outputs differ from PyTorch's by {diff:.2e} "
                               f"in probability and {logit_diff:.2e} in relative logit (more "
                               f"than {PARITY_TOLERANCE:g} / {LOGIT_TOLERANCE:g}); use the "
                               "torch backend")
        logger.info("onnxruntime %s: outputs within %.1e of PyTorch", self.version, diff)


def onnxruntime_runner(model: nn.Module, card: ModelCard, accelerator: Accelerator,
                       threads: int) -> OnnxRuntimeModel:
    """The onnxruntime backend's runner (its entry in models.backend_specs names this):
    `threads` intra-op threads, 0 meaning torch's thread count."""
    crop = card.preprocessing.crop
    return OnnxRuntimeModel(model.cpu().eval(), Normalize(card.preprocessing), task=card.task,
                            classes=card.num_classes, input_shape=(3, crop, crop),
                            threads=threads or torch.get_num_threads())
