"""Predictor: a uint8 image batch in, per-image predictions out (softmax top-k or sigmoid)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.architectures import arch_spec
from models.backends import make_runner
from models.card import ModelCard
from models.device import Accelerator, is_out_of_memory, release_cuda_cache
from models.folding import fold_batch_norms
from models.outputs import check_probabilities

logger = logging.getLogger(__name__)


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


class Predictor:
    """Runs a checkpoint's model on batches and turns outputs into labelled predictions."""

    def __init__(self, model: nn.Module, card: ModelCard, accelerator: Accelerator, *,
                 backend: str = "torch", threads: int = 0) -> None:
        """`backend` names the runner (models.backends): "torch", or "onnxruntime" (CPU,
        fp32 only) on `threads` threads (0: torch's thread count)."""
        self.card = card
        self.accelerator = accelerator
        self.backend = backend
        self.input_shape = (3, card.preprocessing.crop, card.preprocessing.crop)
        probe = torch.randn((1, *self.input_shape), generator=torch.Generator().manual_seed(0))
        folded = fold_batch_norms(model, probe,
                                  conv_bn_prefixes=arch_spec(card.arch).conv_bn_prefixes)
        self.run = make_runner(backend, folded, card, accelerator, threads=threads)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 [N,C] probabilities on the CPU.

        On CUDA out-of-memory the batch is split in halves and retried before giving up.
        """
        if batch.dim() != 4 or tuple(batch.shape[1:]) != self.input_shape:
            shape = ", ".join(map(str, self.input_shape))
            raise ValueError(f"expected a batch of shape [N, {shape}], got {list(batch.shape)}")
        try:
            return self.run(batch)
        except RuntimeError as exc:
            if not (self.accelerator.is_cuda and is_out_of_memory(exc)) or batch.shape[0] == 1:
                raise
            logger.warning("CUDA out of memory at batch %d; splitting and retrying",
                           batch.shape[0])
            release_cuda_cache()
            half = batch.shape[0] // 2
            return torch.cat([self.probabilities(batch[:half]),
                              self.probabilities(batch[half:])])

    def run_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The batch function: uint8 [3,H,W] images -> float32 [N,C] probabilities."""
        return self.probabilities(torch.stack(list(images)))

    def postprocess(self, probs: torch.Tensor, *, top_k: int = 5,
                    threshold: float | None = None, all_scores: bool = False
                    ) -> list[ImageResult]:
        """Turn [N,C] probabilities into one ImageResult per row."""
        if self.card.task == "single_label":
            return self._top_k(probs, top_k, all_scores)
        return self._thresholded(probs, threshold, all_scores)

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run each batch size once so kernels and allocator pools are ready, and prove on
        each that the outputs are well-formed probabilities (else ModelOutputError)."""
        noise = torch.Generator().manual_seed(0)
        for size in sorted(set(batch_sizes)):
            batch = torch.randint(0, 256, (size, *self.input_shape), dtype=torch.uint8,
                                  generator=noise)
            check_probabilities(self.probabilities(batch), rows=size,
                                classes=self.card.num_classes, task=self.card.task)
        self.accelerator.synchronize()

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
