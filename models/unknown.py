""""None of these": how unlike the training data an input looks, and the rule on it.

The score is the cosine distance of an image's pooled features (the head's input) to the
nearest class mean of the training images: `1 - max_c cos(f, mean_c)`, 0 for an image that
sits on a class's mean, up to 1. It was chosen by measurement on real data over the energy
of the logits and the maximum softmax score (docs/training-recipe.md, "Unknown inputs"):
inputs of another kind (photographs or textures shown to a digits model) score far from
every class, while the logits of a classifier can be confident about anything.

The class means are part of the checkpoint: the tensor CLASS_MEANS_KEY in model.safetensors,
[classes, features], each row of unit length; `load` attaches them to the model as the
buffer CLASS_MEANS_ATTR. The rule in the card: the threshold is the score that ACCEPTANCE of
the validation images stay at or under; an input scoring above it is "unknown".
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

METHOD = "cosine"
ACCEPTANCE = 0.95  # share of validation images the stored threshold accepts
CLASS_MEANS_KEY = "unknown.class_means"  # in model.safetensors
CLASS_MEANS_ATTR = "unknown_class_means"  # the buffer on a loaded model


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
    """A classifier answering [N, C + 1]: its logits, then each image's unknown score."""

    def __init__(self, model: nn.Module, head_name: str, class_means: torch.Tensor) -> None:
        super().__init__()
        self.split = WithFeatures(model, head_name)
        self.register_buffer("class_means", class_means.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, features = self.split(x)
        score = cosine_distance(features.float(), self.class_means.float())
        return torch.cat([logits.float(), score.unsqueeze(1)], dim=1)


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


def unknown_record(val_scores: np.ndarray, acceptance: float = ACCEPTANCE) -> dict[str, Any]:
    """The card's `unknown` field from the validation images' scores."""
    threshold = acceptance_threshold(val_scores, acceptance)
    accepted = float(np.mean(np.asarray(val_scores) <= threshold))
    return {"method": METHOD, "threshold": threshold, "acceptance": acceptance,
            "val_accepted": accepted, "val_images": int(len(val_scores))}
