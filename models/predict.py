"""Predictor: a uint8 image batch in, per-image predictions out (softmax top-k or sigmoid).

The model's runner answers one row of outputs per image: the C raw logits, then, for a card
with an unknown-input rule, the image's unknown score (models.unknown), computed in the same
forward pass from the pooled features. The scores (probabilities, with the card's
calibration temperature) are made from the logits here, so every backend and every caller
gets the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.architectures import arch_spec
from models.backends import make_runner
from models.card import ModelCard
from models.device import Accelerator, is_out_of_memory, release_cuda_cache
from models.folding import fold_batch_norms
from models.outputs import ModelOutputError, check_probabilities, probabilities
from models.unknown import WithUnknownScore, unknown_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One label, its index among the card's classes, and its probability."""

    label: str
    score: float
    index: int


@dataclass(frozen=True)
class ImageResult:
    """The predictions for one image; `scores` holds every label when asked for.

    For a card with an unknown-input rule, `unknown_score` is how unlike the training data
    the image looks (0 to 1, higher: less alike) and `unknown` whether it is past the card's
    threshold; both are None for a card without the rule.
    """

    predictions: list[Prediction]
    scores: dict[str, float] | None = None
    unknown: bool | None = None
    unknown_score: float | None = None

    def fields(self) -> dict[str, Any]:
        """The answer's fields as /predict and `training predict` write them: the labels
        with their scores, every label's score when asked for, the unknown verdict where
        the card has the rule."""
        out: dict[str, Any] = {"predictions": [{"label": p.label, "score": p.score}
                                               for p in self.predictions]}
        if self.scores is not None:
            out["scores"] = self.scores
        if self.unknown is not None:
            out["unknown"] = self.unknown
            out["unknown_score"] = self.unknown_score
        return out


class Predictor:
    """Runs a checkpoint's model on batches and turns outputs into labelled predictions."""

    def __init__(self, model: nn.Module, card: ModelCard, accelerator: Accelerator, *,
                 backend: str = "torch", threads: int = 0) -> None:
        """`backend` names the runner (models.backends): "torch", or "onnxruntime" (CPU,
        fp32 only) on `threads` threads (0: torch's thread count). A card with an
        unknown-input rule needs the model to carry the rule's state (checkpoint.load)."""
        self.card = card
        self.accelerator = accelerator
        self.backend = backend
        self.input_shape = (3, card.preprocessing.crop, card.preprocessing.crop)
        rule_state = unknown_state(model)
        if card.unknown is not None and not rule_state:
            raise ValueError("the card has an unknown-input rule but the model carries none "
                             "of its state (class means ...)")
        spec = arch_spec(card.arch)
        probe = torch.randn((1, *self.input_shape), generator=torch.Generator().manual_seed(0))
        graph = fold_batch_norms(model, probe, conv_bn_prefixes=spec.conv_bn_prefixes)
        self.network = graph  # the logits' network as run here (models.cam shares its layers)
        if card.unknown is not None:
            graph = WithUnknownScore(graph, spec.classifier, card.unknown["method"], rule_state)
        self.run = make_runner(backend, graph, card, accelerator, threads=threads)

    @torch.inference_mode()
    def outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 [N, C] raw logits on the CPU, [N, C + 1] with each
        image's unknown score last when the card has the rule.

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
            return torch.cat([self.outputs(batch[:half]), self.outputs(batch[half:])])

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> float32 [N,C] probabilities (calibrated as the card says)."""
        return self.scores(self.outputs(batch))

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """[N, C(+1)] outputs -> the [N, C] probabilities this checkpoint serves
        (ModelOutputError when the outputs are not as wide as the card says)."""
        width = self.card.num_classes + (self.card.unknown is not None)
        if outputs.dim() != 2 or outputs.shape[1] != width:
            rows = outputs.shape[0] if outputs.dim() else 0
            raise ModelOutputError(f"the model answered {outputs.dtype} of shape "
                                   f"{list(outputs.shape)} for {rows} images; expected "
                                   f"floating point of shape [{rows}, {width}]")
        return probabilities(outputs[:, :self.card.num_classes], self.card.task,
                             self.card.temperature)

    def unknown_scores(self, outputs: torch.Tensor) -> torch.Tensor | None:
        """[N, C + 1] outputs -> [N] unknown scores (None for a card without the rule)."""
        return None if self.card.unknown is None else outputs[:, self.card.num_classes]

    def run_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The batch function: uint8 [3,H,W] images -> float32 outputs (see `outputs`)."""
        return self.outputs(torch.stack(list(images)))

    def answer(self, outputs: torch.Tensor, *, top_k: int = 5, threshold: float | None = None,
               all_scores: bool = False, reject_unknown: bool = False) -> list[ImageResult]:
        """Outputs -> one ImageResult per row, with its unknown-input verdict; an unknown
        image gets no labels when `reject_unknown` (the card must have the rule)."""
        if reject_unknown and self.card.unknown is None:
            raise ValueError("reject_unknown needs a card with an unknown-input threshold")
        results = self.postprocess(self.scores(outputs), top_k=top_k, threshold=threshold,
                                   all_scores=all_scores)
        unknown = self.unknown_scores(outputs)
        if unknown is None:
            return results
        cut = self.card.unknown_threshold
        out = []
        for result, score in zip(results, unknown.tolist(), strict=True):
            flagged = score > cut
            predictions = [] if (flagged and reject_unknown) else result.predictions
            out.append(ImageResult(predictions, result.scores, flagged, score))
        return out

    def postprocess(self, probs: torch.Tensor, *, top_k: int = 5,
                    threshold: float | None = None, all_scores: bool = False
                    ) -> list[ImageResult]:
        """Turn [N,C] probabilities into one ImageResult per row (labels and scores only)."""
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
            outputs = self.outputs(batch)
            check_probabilities(self.scores(outputs), rows=size,
                                classes=self.card.num_classes, task=self.card.task)
            unknown = self.unknown_scores(outputs)
            if unknown is not None and not bool(torch.isfinite(unknown).all()):
                raise ModelOutputError("the model answered NaN or infinite unknown scores")
        self.accelerator.synchronize()

    def _top_k(self, probs: torch.Tensor, top_k: int, all_scores: bool) -> list[ImageResult]:
        k = max(1, min(int(top_k), probs.shape[1]))
        scores, indices = probs.topk(k, dim=1)
        classes = self.card.classes
        out = []
        for row_scores, row_idx, row in zip(scores.tolist(), indices.tolist(), probs,
                                            strict=True):
            preds = [Prediction(classes[i], s, i)
                     for s, i in zip(row_scores, row_idx, strict=True)]
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
            preds = sorted((Prediction(classes[i], float(row[i]), i) for i in hits),
                           key=lambda p: p.score, reverse=True)
            out.append(ImageResult(preds, self._all(row) if all_scores else None))
        return out

    def _all(self, row: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.card.classes, row.tolist(), strict=True))
