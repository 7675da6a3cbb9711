"""Validation metrics from scores and targets (numpy; no extra dependencies)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

F1_THRESHOLDS = "2-fold cross-fitted: each half scored with thresholds tuned on the other half"


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[true, predicted]."""
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (target, pred), 1)
    return out


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _per_class(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, support: np.ndarray,
               classes: Sequence[str]) -> dict[str, dict[str, float]]:
    precision = _safe_div(tp.astype(float), (tp + fp).astype(float))
    recall = _safe_div(tp.astype(float), (tp + fn).astype(float))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)}


def single_label_metrics(scores: np.ndarray, target: np.ndarray,
                         classes: Sequence[str]) -> dict[str, Any]:
    """accuracy, top5_accuracy, balanced_accuracy (mean recall over the classes present),
    per_class_recall, per_class, confusion_matrix."""
    n, c = scores.shape
    pred = scores.argmax(axis=1)
    cm = confusion_matrix(pred, target, c)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    k = min(5, c)
    topk = np.argpartition(-scores, k - 1, axis=1)[:, :k] if n else np.zeros((0, k), int)
    recall = _safe_div(tp.astype(float), support.astype(float))
    present = support > 0
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "top5_accuracy": float((topk == target[:, None]).any(axis=1).mean()) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "num_samples": int(n),
        "per_class_recall": {name: float(recall[i]) for i, name in enumerate(classes)},
        "per_class": _per_class(tp, cm.sum(axis=0) - tp, support - tp, support, classes),
        "confusion_matrix": cm.tolist(),
    }


def precision_recall_curve(scores: np.ndarray, positive: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at every distinct score, highest threshold first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(float)
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], int)
    tp, fp = tp[last], fp[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(y.sum(), 1.0)
    return precision, recall, s[last]


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the step precision-recall curve (sum of precision at each recall gain)."""
    if not positive.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(scores, positive)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tune_thresholds(scores: np.ndarray, target: np.ndarray, *, default: float = 0.5
                    ) -> list[float]:
    """Per-class threshold that maximises F1 on these scores (default where a class is absent)."""
    out = []
    for j in range(scores.shape[1]):
        positive = target[:, j] > 0.5
        if not positive.any():
            out.append(default)
            continue
        precision, recall, thresholds = precision_recall_curve(scores[:, j], positive)
        f1 = _safe_div(2 * precision * recall, precision + recall)
        best = int(np.argmax(f1))
        # Halfway to the next lower score generalises better than the exact score.
        lower = thresholds[best + 1] if best + 1 < len(thresholds) else thresholds[best] / 2
        out.append(float(np.clip((thresholds[best] + lower) / 2, 1e-4, 1.0)))
    return out


def cross_fitted_thresholds(scores: np.ndarray, target: np.ndarray, *, folds: int = 2,
                            seed: int = 0) -> np.ndarray:
    """Per-image thresholds (n x classes), each tuned on the folds the image is not in.

    F1 scored with them is what tuned thresholds will do on images they were not tuned on;
    scoring the tuning images themselves would flatter it.
    """
    n = len(scores)
    fold = np.empty(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    out = np.empty(scores.shape, dtype=float)
    for k in range(folds):
        held_out = fold == k
        out[held_out] = tune_thresholds(scores[~held_out], target[~held_out])
    return out


def multi_label_metrics(scores: np.ndarray, target: np.ndarray, classes: Sequence[str],
                        thresholds: Sequence[float], *,
                        decide_with: np.ndarray | None = None) -> dict[str, Any]:
    """mAP, f1_micro, f1_macro and per_class (precision, recall, f1, support, ap, threshold).

    `thresholds` (one per class) are reported and, unless `decide_with` gives per-image
    thresholds (see `cross_fitted_thresholds`), also decide which labels are predicted.
    """
    positive = target > 0.5
    cut = np.asarray(thresholds)[None, :] if decide_with is None else decide_with
    pred = scores >= cut
    tp = (pred & positive).sum(axis=0)
    fp = (pred & ~positive).sum(axis=0)
    fn = (~pred & positive).sum(axis=0)
    per_class = _per_class(tp, fp, fn, positive.sum(axis=0), classes)
    aps = [average_precision(scores[:, j], positive[:, j]) for j in range(len(classes))]
    for j, c in enumerate(classes):
        per_class[c]["ap"] = None if np.isnan(aps[j]) else aps[j]
        per_class[c]["threshold"] = float(thresholds[j])
    valid = [a for a in aps if not np.isnan(a)]
    f1s = [per_class[c]["f1"] for c, s in zip(classes, positive.sum(axis=0), strict=True) if s]
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "mAP": float(np.mean(valid)) if valid else 0.0,
        "f1_micro": float(2 * tp.sum() / denom) if denom else 0.0,
        "f1_macro": float(np.mean(f1s)) if f1s else 0.0,
        "num_samples": int(len(scores)),
        "per_class": per_class,
    }


def held_out_multi_label_metrics(scores: np.ndarray, target: np.ndarray,
                                 classes: Sequence[str]) -> tuple[dict[str, Any], list[float]]:
    """Validation metrics with F1 from 2-fold cross-fitted thresholds, and the thresholds
    tuned on all of it (the ones a checkpoint ships)."""
    thresholds = tune_thresholds(scores, target)
    metrics = multi_label_metrics(scores, target, classes, thresholds,
                                  decide_with=cross_fitted_thresholds(scores, target))
    metrics["f1_thresholds"] = F1_THRESHOLDS
    return metrics, thresholds


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of a metrics dict (for logs, history and the card)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def monitor_name(task: str) -> str:
    """The validation figure that picks the best epoch."""
    return "accuracy" if task == "single_label" else "mAP"


def recall_summary(metrics: dict[str, Any], shown: int = 20) -> str:
    """Single-label: balanced accuracy and each class's recall (the lowest `shown` when there
    are more classes), for the run's closing line; empty for multi-label metrics."""
    recall = metrics.get("per_class_recall")
    if not recall:
        return ""
    ordered = sorted(recall.items(), key=lambda item: item[1])
    part = "" if len(ordered) <= shown else f" (lowest {shown} of {len(ordered)})"
    listed = ", ".join(f"{name} {value:.3f}" for name, value in ordered[:shown])
    return (f", balanced accuracy {metrics['balanced_accuracy']:.4f}, recall by class"
            f"{part}: {listed}")
