""""None of these": how unlike the training data an input looks, and the rule on it.

The score `fit` stores is the stage Mahalanobis score (models.unknown_stages, METHOD): how
far an image's features lie from every class at every residual stage, 0 for a typical
image, higher for less alike ones. It was chosen by measurement over the cosine distance to
the class means, k-nearest-neighbour distances, the energy and the largest logit, the
feature norm and their combinations, on several models and kinds of outside images
(`python -m bench.unknown`, docs/training-recipe.md "Unknown inputs").

Checkpoints written before it carry the cosine rule (COSINE): `1 - max_c cos(f, mean_c)` of
the pooled features f to the unit class means, the tensor CLASS_MEANS_KEY. They still load
and serve.

The rule's state is part of the checkpoint: tensors named `unknown.*` in model.safetensors,
validated at load against the card's method and the model (`state_problem`), carried on a
loaded model as the dict STATE_ATTR. The rule in the card: the threshold is the score that
`acceptance` of the validation images stay at or under; an input scoring above it is
"unknown".
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import unknown_stages
from models.architectures import unwrap

METHOD = "stage_mahalanobis"  # what `fit` stores (models.unknown_stages)
COSINE = "cosine"  # the rule of checkpoints written before it
METHODS = (COSINE, METHOD)
ACCEPTANCE = 0.95  # share of validation images the stored threshold accepts by default
STATE_PREFIX = "unknown."  # the rule's tensors in model.safetensors
CLASS_MEANS_KEY = "unknown.class_means"  # the cosine rule's one tensor
STATE_ATTR = "unknown_state"  # the dict of the rule's tensors on a loaded model


def unknown_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unknown-input rule's tensors carried by `model` (empty when it has none)."""
    return dict(getattr(unwrap(model), STATE_ATTR, None) or {})


def attach_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give `model` its rule's tensors (float32, on the CPU), saved with its weights."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    object.__setattr__(unwrap(model), STATE_ATTR, tensors)


def state_problem(method: str, state: dict[str, torch.Tensor], model: nn.Module, *,
                  classes: int, head_name: str) -> str | None:
    """Why `state` cannot serve the card's `method` on `model` (an unfolded model with
    `classes` outputs; None when it can). The message names the tensor."""
    if method == COSINE:
        features = getattr(model, head_name).in_features
        means = state.get(CLASS_MEANS_KEY)
        if means is None:
            return f"holds no {CLASS_MEANS_KEY}, which the card's unknown-input rule needs"
        extra = sorted(set(state) - {CLASS_MEANS_KEY})
        if tuple(means.shape) != (classes, features) or not means.is_floating_point() \
                or not bool(torch.isfinite(means).all()):
            return (f"{CLASS_MEANS_KEY} must be finite floats of shape [{classes}, "
                    f"{features}], got {means.dtype} {list(means.shape)}")
        return f"holds unknown-input tensors the rule does not use: {extra[:3]}" if extra \
            else None
    if method == METHOD:
        return unknown_stages.state_problem(state, unknown_stages.stage_widths(model), classes)
    return f"the card's unknown-input method {method!r} is not one of {', '.join(METHODS)}"


class WithFeatures(nn.Module):
    """A classifier answering (logits, pooled features): its body with the head replaced by
    an identity, then the head. The wrapped model is not changed."""

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        body = copy.copy(model)
        body._modules = dict(model._modules)  # a copy's own child table, sharing the layers
        body._modules[head_name] = nn.Identity()
        self.body, self.head = body, model._modules[head_name]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.body(x), 1)
        return self.head(features), features


class WithUnknownScore(nn.Module):
    """A classifier answering [N, C + 1]: its logits, then each image's unknown score, from
    one forward pass."""

    def __init__(self, model: nn.Module, head_name: str, method: str,
                 state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.method = method
        if method == COSINE:
            self.split = WithFeatures(model, head_name)
            self.register_buffer("class_means", state[CLASS_MEANS_KEY].detach().clone().float())
        elif method == METHOD:
            self.staged = unknown_stages.StagedNetwork(model, head_name)
            self.score = unknown_stages.StageMahalanobis(state)
        else:
            raise ValueError(f"unknown-input method {method!r} is not one of "
                             f"{', '.join(METHODS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == COSINE:
            logits, features = self.split(x)
            score = cosine_distance(features.float(), self.class_means.float())
        else:
            logits, pooled = self.staged(x)
            score = self.score(pooled)
        return torch.cat([logits.float(), score.float().unsqueeze(1)], dim=1)


def cosine_distance(features: torch.Tensor, unit_means: torch.Tensor) -> torch.Tensor:
    """[N, D] features, [C, D] unit-length class means -> [N] `1 - best cosine similarity`."""
    similarity = F.normalize(features, dim=1, eps=1e-12) @ unit_means.T
    return 1.0 - similarity.max(dim=1).values


def class_means(features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, D] unit-length mean feature of each class's images (class indices, or multi-hot
    rows for multi-label data); a class without images gets the mean of all of them."""
    features = features.double()
    members = (F.one_hot(targets.long(), num_classes) if targets.dim() == 1
               else targets > 0.5).double()  # [N, C]
    counts = members.sum(dim=0)
    sums = members.T @ features
    overall = features.mean(dim=0, keepdim=True).expand_as(sums)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], overall)
    return F.normalize(means, dim=1, eps=1e-12).float()


def acceptance_threshold(scores: Sequence[float] | np.ndarray,
                         acceptance: float = ACCEPTANCE) -> float:
    """The smallest score at or under which at least `acceptance` of `scores` lie."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("the threshold needs at least one finite score")
    rank = max(1, math.ceil(acceptance * values.size - 1e-9))  # how many must be accepted
    return float(values[rank - 1])


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The probability that an out-of-distribution input scores above an in-distribution one
    (ties count half): the area under the ROC curve of "unknown" as the positive class."""
    inside = np.asarray(in_scores, dtype=np.float64)
    outside = np.asarray(out_scores, dtype=np.float64)
    if inside.size == 0 or outside.size == 0:
        raise ValueError("AUROC needs scores on both sides")
    ranks = _average_ranks(np.concatenate([inside, outside]))
    pairs_won = ranks[inside.size:].sum() - outside.size * (outside.size + 1) / 2  # Mann-Whitney
    return float(pairs_won / (inside.size * outside.size))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # the highest rank each distinct value spans
    return (last_rank - (counts - 1) / 2.0)[inverse]


def unknown_record(val_scores: np.ndarray, acceptance: float = ACCEPTANCE, *,
                   method: str = COSINE) -> dict[str, Any]:
    """The card's `unknown` field from the validation images' scores under `method` (the
    cosine rule unless named, as callers before the stage score wrote it)."""
    threshold = acceptance_threshold(val_scores, acceptance)
    accepted = float(np.mean(np.asarray(val_scores) <= threshold))
    return {"method": method, "threshold": threshold, "acceptance": acceptance,
            "val_accepted": accepted, "val_images": int(len(val_scores))}


# What the benchmark (`python -m bench.unknown`, docs/training-recipe.md "Unknown inputs")
# measured the stage score to flag at each acceptance it ran, with the threshold set on each
# model's validation images, over its 17 models (32, 64 and 224 px, short and long runs,
# single- and multi-label) and their 45 far and 8 near pairs. far: inputs of another kind
# (photographs, textures, digits shown to a texture model): the median and the worst pair's
# flagged share, and the share of pairs with at least 80% flagged; near: new classes of the
# same kind (digits 5-9 shown to a digits 0-4 model, other grey pictures to a model of grey
# picture crops), the mean share flagged; own: the models' unseen test images of their own
# kind, the mean and the worst share flagged.
BENCH_FLAGGED: dict[float, dict[str, float]] = {
    0.9: {"far_median": 1.0, "far_worst": 0.2, "far_pairs_80": 0.956, "near_mean": 0.503,
          "own_mean": 0.094, "own_worst": 0.217},
    0.95: {"far_median": 1.0, "far_worst": 0.031, "far_pairs_80": 0.956, "near_mean": 0.41,
           "own_mean": 0.056, "own_worst": 0.152},
    0.99: {"far_median": 1.0, "far_worst": 0.0, "far_pairs_80": 0.822, "near_mean": 0.236,
           "own_mean": 0.02, "own_worst": 0.06},
}
BENCH_SOURCE = "python -m bench.unknown (docs/training-recipe.md#unknown-inputs)"


def expected_flagging(acceptance: float) -> dict[str, Any]:
    """The card's `expected_flagged` figures for a rule at `acceptance` (empty where the
    benchmark did not run that acceptance)."""
    figures = BENCH_FLAGGED.get(round(acceptance, 4))
    if figures is None:
        return {}
    return {"expected_flagged": {"acceptance": acceptance, **figures,
                                 "measured_by": BENCH_SOURCE}}
