"""What a model's outputs mean: probabilities from logits by task, and the check on them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Temperature = float | Sequence[float] | None  # one for softmax, one per class for sigmoid

SOFTMAX_TOLERANCE = 1e-3  # how far a single-label row's probabilities may sum from 1


class ModelOutputError(RuntimeError):
    """A model answered something other than well-formed probabilities (shape, NaN, range)."""


def probabilities(logits: torch.Tensor, task: str, temperature: Temperature = None
                  ) -> torch.Tensor:
    """[N, C] logits -> probabilities: softmax over classes (single-label), else per-class
    sigmoid (multi-label), of logits / `temperature` when a card holds one (a checkpoint's
    `card.temperature`). Every place that turns logits into scores calls this."""
    if temperature is not None:
        logits = logits / torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    return torch.softmax(logits, dim=1) if task == "single_label" else torch.sigmoid(logits)


def check_probabilities(probs: torch.Tensor, *, rows: int, classes: int, task: str) -> None:
    """Raise ModelOutputError unless `probs` is [rows, classes] of finite probabilities in
    [0, 1] whose rows sum to 1 for a single-label model."""
    expected = [rows, classes]
    if list(probs.shape) != expected or not probs.is_floating_point():
        raise ModelOutputError(f"the model answered {probs.dtype} of shape "
                               f"{list(probs.shape)} for {rows} images; expected "
                               f"floating point of shape {expected}")
    if not bool(torch.isfinite(probs).all()):
        raise ModelOutputError("the model answered NaN or infinite scores")
    if float(probs.min()) < 0.0 or float(probs.max()) > 1.0:
        raise ModelOutputError("the model answered scores outside [0, 1]")
    if task == "single_label":
        worst = float((probs.double().sum(dim=1) - 1.0).abs().max())
        if worst > SOFTMAX_TOLERANCE:
            raise ModelOutputError(f"the model's softmax rows sum to 1 +- {worst:.3g}, "
                                   f"more than {SOFTMAX_TOLERANCE} away")
