"""The candidate unknown-input scores of the bench, each fitted on a model's training-image
features (and, for combinations, standardised on its validation images). Every score is
"higher = more unusual". `stage_mahalanobis` is the one `fit` stores, computed by the same
code (models.unknown_stages)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bench.unknown_features import Features
from models.unknown_stages import SHRINKAGE, StageMahalanobis, fit_state

Scorer = Callable[[Features], np.ndarray]
KNN_BANK = 256  # the bounded bank: training features a checkpoint would carry for kNN


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _members(targets: np.ndarray, classes: int) -> np.ndarray:
    """[N, C] 0/1 membership from class indices or multi-hot rows."""
    if targets.ndim == 1:
        return np.eye(classes, dtype=np.float64)[targets.astype(int)]
    return (targets > 0.5).astype(np.float64)


def knn(bank: np.ndarray, k: int, *, limit: int | None = None
        ) -> Callable[[np.ndarray], np.ndarray]:
    """1 - the cosine similarity to the k-th nearest of `bank` (Sun et al. 2022); with
    `limit`, of a seeded sample of at most that many of its rows (the size a checkpoint
    would store)."""
    if limit is not None and len(bank) > limit:
        bank = bank[np.random.default_rng(0).choice(len(bank), limit, replace=False)]
    unit_bank = torch.as_tensor(_unit(bank), dtype=torch.float32)
    k = min(k, len(bank))

    def score(x: np.ndarray) -> np.ndarray:
        sims = torch.as_tensor(_unit(x), dtype=torch.float32) @ unit_bank.T
        return 1.0 - sims.topk(k, dim=1).values[:, -1].numpy()
    return score


def mahalanobis(features: np.ndarray, targets: np.ndarray | None, classes: int, *,
                shrink: float = 0.1, relative: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """The smallest Mahalanobis distance to a class mean under one shared covariance (Lee et
    al. 2018), its trace-scaled identity mixed in by `shrink`; `targets` None: one Gaussian.
    `relative`: minus the distance under the Gaussian of all the images (Ren et al. 2021)."""
    x = features.astype(np.float64)
    members = (np.ones((len(x), 1)) if targets is None else _members(targets, classes))
    counts = members.sum(0)
    means = (members.T @ x) / np.maximum(counts, 1)[:, None]
    means = means[counts > 0]
    members = members[:, counts > 0]
    pairs_i, pairs_c = np.nonzero(members)
    residual = x[pairs_i] - means[pairs_c]
    cov = residual.T @ residual / len(residual)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = torch.as_tensor(np.linalg.pinv(cov, hermitian=True))
    mu = torch.as_tensor(means)
    overall = x.mean(0)
    back = np.cov(x.T, bias=True)
    back = (1 - shrink) * back + shrink * np.trace(back) / len(back) * np.eye(len(back))
    back_precision = torch.as_tensor(np.linalg.pinv(back, hermitian=True))

    def score(f: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(f, dtype=torch.float64)
        diff = t[:, None, :] - mu[None]  # [N, C, D]
        d = torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(dim=1).values
        if relative:
            b = t - torch.as_tensor(overall)
            d = d - torch.einsum("nd,de,ne->n", b, back_precision, b)
        return d.numpy()
    return score


def _standardised(parts: list[Scorer], val: Features, combine: str = "sum") -> Scorer:
    """The sum (or max) of the parts, each scaled to mean 0, standard deviation 1 on `val`."""
    stats = []
    for part in parts:
        s = part(val)
        stats.append((float(s.mean()), float(s.std()) or 1.0))

    def score(f: Features) -> np.ndarray:
        z = np.stack([(p(f) - m) / sd for p, (m, sd) in zip(parts, stats, strict=True)])
        return z.sum(0) if combine == "sum" else z.max(0)
    return score


def _stage_mahalanobis(train: Features, classes: int, *, conditional: bool, stds: bool,
                       last_conditional: bool = True, stem: bool = False) -> list[Scorer]:
    """One Mahalanobis part per stage (its mean, and with `stds` its standard deviation,
    pooled), class-conditional where asked; the last stage class-conditional by default;
    the stem's output a stage too with `stem`."""
    parts = []
    count = len(train.stages)
    for i in range(0 if stem else 1, count):
        def view(f: Features, i: int = i) -> np.ndarray:
            return np.concatenate([f.stages[i], f.stage_stds[i]], 1) if stds else f.stages[i]
        cond = conditional or (last_conditional and i == count - 1)
        fitted = mahalanobis(view(train), train.targets if cond else None, classes)
        parts.append(lambda f, g=fitted, v=view: g(v(f)))
    return parts


def stage_mahalanobis(train: Features, val: Features, classes: int, *,
                      shrinkage: float = SHRINKAGE, first: int = 1, combine: str = "sum"
                      ) -> Scorer:
    """The score `fit` stores (models.unknown_stages), fitted as `fit` fits it; `first` 0
    counts the stem's output as a stage too, `combine` "max" takes the largest standardised
    stage distance instead of their sum."""
    def stages(f: Features) -> list[torch.Tensor]:
        return [torch.as_tensor(s) for s in f.stages[first:]]  # [0] is the stem's output
    state = fit_state([(stages(train), torch.as_tensor(train.targets))], stages(val), classes,
                      shrinkage=shrinkage)
    scorer = StageMahalanobis(state)

    def score(f: Features) -> np.ndarray:
        with torch.no_grad():
            if combine == "sum":
                return scorer(stages(f)).numpy()
            distances = scorer.distances(stages(f))
            return ((distances - scorer.offset) / scorer.scale).max(dim=1).values.numpy()
    return score


def candidates(train: Features, val: Features, classes: int, multi_label: bool
               ) -> dict[str, Scorer]:
    """Every candidate score, fitted on `train` (standardised on `val` where combined)."""
    targets = train.targets
    out: dict[str, Scorer] = {
        "msp": (lambda f: -torch.sigmoid(torch.as_tensor(f.logits)).max(1).values.numpy())
        if multi_label else
        (lambda f: -torch.softmax(torch.as_tensor(f.logits), 1).max(1).values.numpy()),
        "max_logit": lambda f: -f.logits.max(1),
        "energy": lambda f: -torch.logsumexp(torch.as_tensor(f.logits), 1).numpy(),
        "feature_norm": lambda f: -np.linalg.norm(f.pooled, axis=1),
    }
    members = _members(targets, classes)
    means = _unit((members.T @ train.pooled.astype(np.float64))
                  / np.maximum(members.sum(0), 1)[:, None])
    out["cosine"] = lambda f: 1.0 - (_unit(f.pooled) @ means.T).max(1)
    for k in (1, 5, 20):
        scorer = knn(train.pooled, k)
        out[f"knn{k}"] = lambda f, s=scorer: s(f.pooled)
    bounded = knn(train.pooled, 5, limit=KNN_BANK)
    out[f"knn5@{KNN_BANK}"] = lambda f: bounded(f.pooled)
    maha = mahalanobis(train.pooled, targets, classes)
    out["mahalanobis"] = lambda f: maha(f.pooled)
    rel = mahalanobis(train.pooled, targets, classes, relative=True)
    out["rel_mahalanobis"] = lambda f: rel(f.pooled)
    stage_knn = [knn(s, 5) for s in train.stages[1:]]
    out["knn5_stages"] = _standardised(
        [lambda f, i=i: stage_knn[i](f.stages[i + 1]) for i in range(len(stage_knn))], val)
    plain = _stage_mahalanobis(train, classes, conditional=False, stds=False)
    out["maha_stages_1gauss"] = _standardised(plain, val)
    out["maha_stages_std"] = _standardised(
        _stage_mahalanobis(train, classes, conditional=False, stds=True,
                           last_conditional=False), val)
    out["knn5+mahalanobis"] = _standardised([out["knn5"], out["mahalanobis"]], val)
    out["knn5+energy"] = _standardised([out["knn5"], out["energy"]], val)
    out["knn5+norm"] = _standardised([out["knn5"], out["feature_norm"]], val)
    out["mahalanobis+energy"] = _standardised([out["mahalanobis"], out["energy"]], val)
    for shrinkage in (0.01, 0.03, 0.1, 0.5):
        name = "stage_mahalanobis" + ("" if shrinkage == SHRINKAGE else f"@{shrinkage:g}")
        out[name] = stage_mahalanobis(train, val, classes, shrinkage=shrinkage)
    out["stage_mahalanobis+stem"] = stage_mahalanobis(train, val, classes, first=0)
    out["stage_mahalanobis_max"] = stage_mahalanobis(train, val, classes, combine="max")
    out["stage_mahalanobis+energy"] = _standardised([out["stage_mahalanobis"],
                                                     out["energy"]], val)
    return out
