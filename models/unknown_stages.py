"""The stage Mahalanobis score: how far an image's features lie from every class, at every
residual stage of the network (Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples", its feature ensemble with equal weights).

At each stage s (layer1, layer2, ... of a ResNet) an image's output is averaged over space
into f_s. The training images give, per stage, one mean per class and one covariance shared
by the classes (the within-class scatter, mixed with SHRINKAGE of its trace-scaled
identity so that a small or narrow training set still gives a usable inverse). An image's
distance at a stage is its smallest squared Mahalanobis distance to a class mean,
d_s = min_c (f_s - mean_c)^T cov^-1 (f_s - mean_c). The score is the sum over the stages of
(d_s - offset_s) / scale_s, the offset and scale being the mean and standard deviation of
d_s over the validation images: 0 for a typical image, higher for less alike ones. Early
stages see colour, contrast and texture, the last one the classes: one sum catches inputs
of another kind even where a weak model's last features would not (docs/training-recipe.md,
"Unknown inputs"). Multi-label images count towards the mean of each class they carry.

The state (model.safetensors tensors, see `state_keys`): per stage `unknown.stageS.means`
[C, D_s] and `unknown.stageS.whitening` [D_s, D_s] (W with W^T W = cov^-1), and
`unknown.standardise` [S, 2] (offset, scale per stage).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# share of the trace-scaled identity mixed into each covariance: of 0.01, 0.03, 0.1 and 0.5,
# the least gave the highest AUROC on every far-away pair of python -m bench.unknown
SHRINKAGE = 0.01
STANDARDISE_KEY = "unknown.standardise"


def stage_key(stage: int, what: str) -> str:
    """The safetensors name of one stage's tensor ("means" or "whitening")."""
    return f"unknown.stage{stage}.{what}"


def stage_names(model: nn.Module) -> list[str]:
    """The residual stages of a ResNet, in order: its children layer1, layer2, ..."""
    names, index = [], 1
    children = dict(model.named_children())
    while f"layer{index}" in children:
        names.append(f"layer{index}")
        index += 1
    return names


def stage_widths(model: nn.Module) -> list[int]:
    """Each stage's output channels (its last batch norm's width; a ResNet stage ends in
    one), read from an unfolded model."""
    children = dict(model.named_children())
    widths = []
    for name in stage_names(model):
        norms = [m for m in children[name].modules() if isinstance(m, nn.BatchNorm2d)]
        if not norms:
            raise ValueError(f"stage {name} has no batch norm to read its width from")
        widths.append(norms[-1].num_features)
    return widths


def state_keys(widths: Sequence[int], classes: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the state and its shape, for stages of `widths` and `classes`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for s, width in enumerate(widths):
        shapes[stage_key(s, "means")] = (classes, width)
        shapes[stage_key(s, "whitening")] = (width, width)
    shapes[STANDARDISE_KEY] = (len(widths), 2)
    return shapes


class StagedNetwork(nn.Module):
    """A ResNet answering (logits, [each stage's output averaged over space]) in one pass:
    its children run in order, flattened before the head, as the ResNets' own forward does.
    The wrapped model is not changed (its layers are shared)."""

    def __init__(self, model: nn.Module, head_name: str) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(dict(model.named_children()))
        if list(self.layers)[-1] != head_name:
            raise ValueError(f"the head {head_name!r} must be the model's last child")
        self.head_name = head_name
        self.stages = frozenset(stage_names(model))
        if not self.stages:
            raise ValueError("the model has no residual stages (layer1, layer2, ...)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled = []
        for name, layer in self.layers.items():
            if name == self.head_name:
                x = layer(torch.flatten(x, 1))
            else:
                x = layer(x)
                if name in self.stages:
                    pooled.append(x.mean(dim=(2, 3)))
        return x, pooled


class StageStatistics:
    """Running float64 sums over the training images for every stage's class Gaussians."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums: list[torch.Tensor] = []  # [C, D] per stage
        self.scatter: list[torch.Tensor] = []  # [D, D] per stage, weighted by classes carried
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.overall: list[torch.Tensor] = []  # [D] per stage
        self.images = 0

    def add(self, pooled: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        """One batch: each stage's [N, D] pooled features and the class indices or
        multi-hot rows of its images."""
        members = (nn.functional.one_hot(targets.long(), self.num_classes)
                   if targets.dim() == 1 else targets > 0.5).double().cpu()  # [N, C]
        weights = members.sum(dim=1)
        if not self.sums:
            for f in pooled:
                width = f.shape[1]
                self.sums.append(torch.zeros(self.num_classes, width, dtype=torch.float64))
                self.scatter.append(torch.zeros(width, width, dtype=torch.float64))
                self.overall.append(torch.zeros(width, dtype=torch.float64))
        for s, f in enumerate(pooled):
            f = f.detach().double().cpu()
            self.sums[s] += members.T @ f
            self.scatter[s] += (f * weights[:, None]).T @ f
            self.overall[s] += f.sum(dim=0)
        self.counts += members.sum(dim=0)
        self.images += len(members)

    def gaussians(self, shrinkage: float = SHRINKAGE) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stage: the [C, D] class means (a class without images gets the mean of all)
        and the [D, D] whitening of the shared, shrunk covariance."""
        if not self.images or not self.counts.sum():
            raise ValueError("the stage statistics need at least one labelled image")
        missing = int((self.counts == 0).sum())
        if missing:
            logger.warning("%d classes have no training images: their mean is that of all",
                           missing)
        out = []
        for sums, scatter, overall in zip(self.sums, self.scatter, self.overall, strict=True):
            means = torch.where(self.counts[:, None] > 0,
                                sums / self.counts.clamp(min=1)[:, None],
                                (overall / self.images).expand_as(sums))
            within = scatter - (means * self.counts[:, None]).T @ means
            covariance = within / self.counts.sum()
            out.append((means.float(), whitening(covariance, shrinkage).float()))
        return out


def whitening(covariance: torch.Tensor, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """W with W^T W the inverse of (1 - shrinkage) cov + shrinkage trace(cov)/D I."""
    cov = covariance.double()
    cov = (cov + cov.T) / 2
    width = cov.shape[0]
    scale = float(torch.trace(cov)) / width
    if not scale > 0:
        scale = 1.0  # features that never vary: any whitening serves
    shrunk = (1 - shrinkage) * cov + shrinkage * scale * torch.eye(width, dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(shrunk)
    return (vectors * values.clamp(min=shrinkage * scale * 1e-3).rsqrt()).T


class StageDistances(nn.Module):
    """Pooled stage features -> [N, S] smallest squared Mahalanobis distance per stage,
    in float32 whatever autocast is on (the expansion |z|^2 - 2 z.m + |m|^2 over whitened,
    centred features, so 1000 classes cost no [N, C, D] tensor)."""

    def __init__(self, gaussians: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.count = len(gaussians)
        for s, (means, white) in enumerate(gaussians):
            means, white = means.double(), white.double()
            center = means.mean(dim=0)
            whitened = (means - center) @ white.T
            self.register_buffer(f"center{s}", center.float())
            self.register_buffer(f"white{s}", white.float())
            self.register_buffer(f"means{s}", whitened.float())
            self.register_buffer(f"norms{s}", (whitened ** 2).sum(dim=1).float())

    def forward(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        out = []
        with torch.autocast(device_type=pooled[0].device.type, enabled=False):
            for s, f in enumerate(pooled):
                z = (f.float() - getattr(self, f"center{s}")) @ getattr(self, f"white{s}").T
                d = ((z * z).sum(dim=1, keepdim=True) - 2 * z @ getattr(self, f"means{s}").T
                     + getattr(self, f"norms{s}"))
                out.append(d.min(dim=1).values.clamp(min=0.0))
        return torch.stack(out, dim=1)


class StageMahalanobis(nn.Module):
    """Pooled stage features -> [N] score: the sum of the standardised stage distances."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        standardise = state[STANDARDISE_KEY].float()
        stages = standardise.shape[0]
        self.distances = StageDistances([(state[stage_key(s, "means")],
                                          state[stage_key(s, "whitening")])
                                         for s in range(stages)])
        self.register_buffer("offset", standardise[:, 0].clone())
        self.register_buffer("scale", standardise[:, 1].clone())

    def forward(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        distances = self.distances(pooled)
        return ((distances - self.offset) / self.scale).sum(dim=1)


def fit_state(train: Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]],
              val: Sequence[torch.Tensor], num_classes: int, *,
              shrinkage: float = SHRINKAGE) -> dict[str, torch.Tensor]:
    """The state from batches of (pooled stage features, targets) of the training images
    and the [N, D_s] pooled stage features of the validation images."""
    statistics = StageStatistics(num_classes)
    for pooled, targets in train:
        statistics.add(pooled, targets)
    gaussians = statistics.gaussians(shrinkage)
    with torch.no_grad():
        distances = StageDistances(gaussians)(list(val)).double()  # [N, S]
    if distances.shape[0] < 2:
        raise ValueError("standardising the stage distances needs two validation images")
    offset, scale = distances.mean(dim=0), distances.std(dim=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    state = {}
    for s, (means, white) in enumerate(gaussians):
        state[stage_key(s, "means")] = means
        state[stage_key(s, "whitening")] = white
    state[STANDARDISE_KEY] = torch.stack([offset, scale], dim=1).float()
    return state


def state_problem(state: dict[str, torch.Tensor], widths: Sequence[int], classes: int
                  ) -> str | None:
    """Why `state` cannot serve a model with stages of `widths` and `classes` (None when
    it can): a tensor missing, of the wrong shape or kind, not finite, or a scale <= 0."""
    expected = state_keys(widths, classes)
    for key, shape in expected.items():
        tensor = state.get(key)
        if tensor is None:
            return f"holds no {key}, which the card's unknown-input rule needs"
        if tuple(tensor.shape) != shape or not tensor.is_floating_point() \
                or not bool(torch.isfinite(tensor).all()):
            return (f"{key} must be finite floats of shape {list(shape)}, got {tensor.dtype} "
                    f"{list(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        return f"holds unknown-input tensors the rule does not use: {extra[:3]}"
    if not bool((state[STANDARDISE_KEY][:, 1] > 0).all()):
        return f"{STANDARDISE_KEY} must have positive scales (its second column)"
    return None
