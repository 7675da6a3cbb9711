"""Predictor: a uint8 image batch in, per-image predictions out (softmax top-k or sigmoid)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.checkpoint import ModelCard
from models.device import Runtime, is_out_of_memory, release_cuda_cache
from models.onnx_backend import BackendError, OnnxRuntimeModel
from models.preprocessing import Normalize

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
SOFTMAX_TOLERANCE = 1e-3  # how far a single-label row's probabilities may sum from 1


class ModelOutputError(RuntimeError):
    """A model answered something other than well-formed probabilities (shape, NaN, range)."""


def backend_device(backend: str, device: str) -> str:
    """The device to run `backend` on: ONNX Runtime always runs on the CPU."""
    return "cpu" if backend == "onnxruntime" else device


@dataclass(frozen=True)
class Prediction:
    """One label and its probability."""

    label: str
    score: float


@dataclass(frozen=True)
class ImageResult:
    """The predictions for one image; `scores` holds every label when asked for."""

    predictions: list[Prediction]
    scores: dict[str, float] | None = None


def fold_batch_norms(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """An inference copy of `model` with each BatchNorm folded into the convolution before it.

    Folds the pairs a ResNet has: `convN` followed by `bnN` in one block, and a Conv2d followed
    by a BatchNorm2d in an nn.Sequential (the downsample branch). The result computes the same
    function with one op fewer per convolution; it is checked on `probe` (one input batch)
    and `model` itself is returned when the outputs differ or nothing could be folded.
    `model` is never changed.
    """
    folded = copy.deepcopy(model).eval()
    pairs = 0
    for parent in list(folded.modules()):
        children = dict(parent.named_children())
        for name, conv in children.items():
            bn_name = _batch_norm_after(parent, name, children)
            if bn_name is None or not isinstance(conv, nn.Conv2d):
                continue
            bn = children[bn_name]
            if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
                continue
            setattr(parent, name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            pairs += 1
    if not pairs:
        return model
    was_training = model.training
    model.eval()
    probe = probe.to(next(model.parameters()).device)
    try:
        with torch.inference_mode():
            expected, got = model(probe), folded(probe)
    finally:
        model.train(was_training)
    tolerance = 1e-3 * max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or float((got - expected).abs().max()) > tolerance:
        logger.warning("folding batch norms changed the outputs of %s; running it unfolded",
                       type(model).__name__)
        return model
    return folded


def _batch_norm_after(parent: nn.Module, name: str, children: dict[str, nn.Module]
                      ) -> str | None:
    """The name of the BatchNorm that follows the convolution `name` in `parent`, if any."""
    if isinstance(parent, nn.Sequential) and name.isdigit():
        after = str(int(name) + 1)
        return after if after in children else None
    if name.startswith("conv") and f"bn{name[4:]}" in children:
        return f"bn{name[4:]}"
    return None


class Predictor:
    """Runs a checkpoint's model on batches and turns outputs into labelled predictions."""

    def __init__(self, model: nn.Module, card: ModelCard, runtime: Runtime, *,
                 backend: str = "torch", threads: int = 0) -> None:
        """`backend` "onnxruntime" runs the model with ONNX Runtime (CPU, fp32 only) on
        `threads` threads (0: torch's thread count); see models.onnx_backend."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.card = card
        self.runtime = runtime
        self.backend = backend
        self.input_shape = (3, card.preprocessing.crop, card.preprocessing.crop)
        probe = torch.randn((1, *self.input_shape), generator=torch.Generator().manual_seed(0))
        folded = fold_batch_norms(model, probe)
        self.normalize = Normalize(card.preprocessing).to(runtime.device)
        self.onnx: OnnxRuntimeModel | None = None
        if backend == "onnxruntime":
            if runtime.is_cuda or runtime.amp_dtype is not None:
                raise BackendError("the onnxruntime backend runs fp32 on the CPU; use "
                                   f"device cpu and precision fp32 (got {runtime.describe()}, "
                                   f"{runtime.precision_name})")
            self.model: nn.Module = folded.cpu().eval()  # ONNX Runtime runs the batches
            self.onnx = OnnxRuntimeModel(
                self.model, self.normalize, multi_label=card.task == "multi_label",
                input_shape=self.input_shape, threads=threads or torch.get_num_threads())
        else:
            self.model = runtime.prepare_model(folded).eval()

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 [N,C] probabilities on the CPU.

        On CUDA out-of-memory the batch is split in halves and retried before giving up.
        """
        if batch.dim() != 4 or tuple(batch.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"expected a batch of shape [N, {shape}], got {list(batch.shape)}")
        try:
            return self._forward(batch)
        except RuntimeError as exc:
            if not (self.runtime.is_cuda and is_out_of_memory(exc)) or batch.shape[0] == 1:
                raise
            logger.warning("CUDA out of memory at batch %d; splitting and retrying",
                           batch.shape[0])
            release_cuda_cache()
            half = batch.shape[0] // 2
            return torch.cat([self.probabilities(batch[:half]),
                              self.probabilities(batch[half:])])

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.onnx is not None:
            return self.onnx(batch)
        x = self.normalize(self.runtime.to_device(batch))
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            logits = self.model(x)
        logits = logits.float()
        probs = (torch.softmax(logits, dim=1) if self.card.task == "single_label"
                 else torch.sigmoid(logits))
        return probs.cpu()

    def postprocess(self, probs: torch.Tensor, *, top_k: int = 5,
                    threshold: float | None = None, all_scores: bool = False
                    ) -> list[ImageResult]:
        """Turn [N,C] probabilities into one ImageResult per row."""
        if self.card.task == "single_label":
            return self._top_k(probs, top_k, all_scores)
        return self._thresholded(probs, threshold, all_scores)

    def predict(self, batch: torch.Tensor, **options: object) -> list[ImageResult]:
        """Probabilities then post-processing, for one batch with one set of options."""
        return self.postprocess(self.probabilities(batch), **options)  # type: ignore[arg-type]

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once so kernels and allocator pools are ready, and prove on
        each that the outputs are well-formed probabilities (else ModelOutputError)."""
        noise = torch.Generator().manual_seed(0)
        for size in sorted(set(batch_sizes)):
            batch = torch.randint(0, 256, (size, *self.input_shape), dtype=torch.uint8,
                                  generator=noise)
            self.check_probabilities(self.probabilities(batch), rows=size)
        self.runtime.synchronize()

    def check_probabilities(self, probs: torch.Tensor, *, rows: int) -> None:
        """Raise ModelOutputError unless `probs` is [rows, classes] of finite probabilities
        in [0, 1] whose rows sum to 1 for a single-label model."""
        expected = [rows, self.card.num_classes]
        if list(probs.shape) != expected or not probs.is_floating_point():
            raise ModelOutputError(f"the model answered {probs.dtype} of shape "
                                   f"{list(probs.shape)} for {rows} images; expected "
                                   f"floating point of shape {expected}")
        if not bool(torch.isfinite(probs).all()):
            raise ModelOutputError("the model answered NaN or infinite scores")
        if float(probs.min()) < 0.0 or float(probs.max()) > 1.0:
            raise ModelOutputError("the model answered scores outside [0, 1]")
        if self.card.task == "single_label":
            worst = float((probs.double().sum(dim=1) - 1.0).abs().max())
            if worst > SOFTMAX_TOLERANCE:
                raise ModelOutputError(f"the model's softmax rows sum to 1 +- {worst:.3g}, "
                                       f"more than {SOFTMAX_TOLERANCE} away")

    def _top_k(self, probs: torch.Tensor, top_k: int, all_scores: bool) -> list[ImageResult]:
        k = max(1, min(int(top_k), probs.shape[1]))
        scores, indices = probs.topk(k, dim=1)
        classes = self.card.classes
        out = []
        for row_scores, row_idx, row in zip(scores.tolist(), indices.tolist(), probs,
                                            strict=True):
            preds = [Prediction(classes[i], s) for s, i in zip(row_scores, row_idx, strict=True)]
            out.append(ImageResult(preds, self._all(row) if all_scores else None))
        return out

    def _thresholded(self, probs: torch.Tensor, threshold: float | None,
                     all_scores: bool) -> list[ImageResult]:
        if threshold is not None:
            cut = torch.full((probs.shape[1],), float(threshold))
        elif self.card.thresholds is not None:
            cut = torch.tensor(self.card.thresholds, dtype=probs.dtype)
        else:
            cut = torch.full((probs.shape[1],), 0.5)
        classes = self.card.classes
        out = []
        for row in probs:
            hits = (row >= cut).nonzero().flatten().tolist()
            preds = sorted((Prediction(classes[i], float(row[i])) for i in hits),
                           key=lambda p: p.score, reverse=True)
            out.append(ImageResult(preds, self._all(row) if all_scores else None))
        return out

    def _all(self, row: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.card.classes, row.tolist(), strict=True))
