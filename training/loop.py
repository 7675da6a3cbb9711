"""The training step machinery: optimizer, schedule, loss, one epoch, and evaluation."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.architectures import classifier_parameters
from models.device import Accelerator
from models.outputs import probabilities
from training.data import Batch
from training.distributed import DistInfo, all_reduce_mean, gather_objects
from training.exceptions import DataError, NonFiniteError
from training.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss: float
    images: int
    seconds: float
    failed: set[int] = field(default_factory=set)  # dataset indices that did not decode
    seen: int = 0  # images this rank trained on

    @property
    def images_per_second(self) -> float:
        """Training throughput over all ranks."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalOutput:
    """Validation scores and targets of every sample once, in dataset order, plus the loss."""

    scores: np.ndarray
    targets: np.ndarray
    loss: float
    failed: list[int] = field(default_factory=list)  # dataset indices excluded (not decodable)
    logits: np.ndarray | None = None  # the raw outputs the scores came from, same order


def build_optimizer(model: nn.Module, recipe: Recipe, *, arch: str) -> torch.optim.AdamW:
    """AdamW with four groups: backbone/head x decay/no-decay (norm weights and biases)."""
    head_ids = {id(p) for p in classifier_parameters(model, arch)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part = "head" if id(p) in head_ids else "backbone"
        groups.setdefault((part, p.ndim > 1), []).append(p)
    param_groups = []
    for (part, decay), params in sorted(groups.items()):
        scale = 1.0 if part == "head" else recipe.backbone_lr_scale
        param_groups.append({"params": params, "lr": recipe.lr * scale, "part": part,
                             "weight_decay": recipe.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, lr=recipe.lr, betas=(0.9, 0.999))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    freeze_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 1%, per step; backbone LR held at 0 while frozen."""
    def lr_multiplier(step: int) -> float:
        """The factor on a group's base LR at `step`."""
        if step < warmup_steps:
            return 0.01 + 0.99 * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def backbone_lr_multiplier(step: int) -> float:
        """The same factor for the backbone, 0 during the head-only warm-up."""
        return 0.0 if step < freeze_steps else lr_multiplier(step)

    multipliers = [backbone_lr_multiplier if g.get("part") == "backbone" else lr_multiplier
                   for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)


def build_criterion(task: str, *, label_smoothing: float, train_targets: torch.Tensor,
                    class_weight: torch.Tensor | None = None,
                    pos_weight: str | None = "balanced") -> nn.Module:
    """Label-smoothed cross-entropy (optionally class-weighted), or BCE: plain with
    `pos_weight` "none", with per-class pos_weight = negatives/positives with "balanced"."""
    if task == "single_label":
        return nn.CrossEntropyLoss(weight=class_weight, label_smoothing=label_smoothing)
    if pos_weight == "none":
        return nn.BCEWithLogitsLoss()
    positives = train_targets.sum(dim=0)
    negatives = train_targets.shape[0] - positives
    pos_weight = torch.where(positives > 0, negatives / positives.clamp(min=1),
                             torch.ones_like(positives)).clamp(1.0, 100.0)
    return nn.BCEWithLogitsLoss(pos_weight=pos_weight)


def train_one_epoch(model: nn.Module, loader: DataLoader, *, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, accelerator: Accelerator, normalize: nn.Module,
                    info: DistInfo, epoch: int, epochs: int, progress: bool,
                    image_size: int = 32) -> EpochStats:
    """One pass over the training data; returns the mean loss across ranks.

    Images that fail to decode are left out of their batch and their indices returned; a loss
    that is not finite stops the run before the optimizer applies it.
    """
    model.train()
    total_loss, seen, failed, start = 0.0, 0, set(), time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, leave=False,
               disable=not (progress and info.is_main), dynamic_ncols=True, unit="batch")
    for step, batch in enumerate(bar):
        failed.update(batch.failed.tolist())
        n = batch.images.shape[0]
        if n == 0 and not info.enabled:
            continue
        with accelerator.autocast():
            loss = _batch_loss(model, batch, criterion, accelerator, normalize, image_size)
        value = loss.item()
        if not math.isfinite(value):
            head_lr = optimizer.param_groups[-1]["lr"]
            raise NonFiniteError(
                f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}: the "
                f"run diverged and was stopped (head LR then {head_lr:.3g}); lower --lr or "
                "--backbone-lr-scale, or try --no-amp")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += value * n
        seen += n
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}",
                        img_s=f"{seen * info.world_size / elapsed:.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    mean_loss = all_reduce_mean(info, total_loss / max(seen, 1), seen)
    return EpochStats(loss=mean_loss, images=seen * info.world_size, seconds=seconds,
                      failed=failed, seen=seen)


def _batch_loss(model: nn.Module, batch: Batch, criterion: nn.Module, accelerator: Accelerator,
                normalize: nn.Module, image_size: int) -> torch.Tensor:
    """The batch's loss; a batch with no decodable image (possible only under DDP, where every
    rank must take part in each step) runs one blank image in eval mode at zero weight."""
    if batch.images.shape[0] > 0:
        x = normalize(accelerator.to_device(batch.images))
        y = batch.targets.to(accelerator.device, non_blocking=True)
        return criterion(model(x).float(), y)
    blank = torch.zeros(1, 3, image_size, image_size, device=accelerator.device)
    model.eval()
    try:
        return model(blank).float().sum() * 0.0
    finally:
        model.train()


@torch.inference_mode()
def predict_scores(model: nn.Module, loader: DataLoader, *, accelerator: Accelerator,
                   normalize: nn.Module, task: str,
                   on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor, list[int]]:
    """Scores, targets, dataset indices and raw logits for this rank's share of `loader`,
    and the indices of the images that could not be decoded (left out of the rest)."""
    model.eval()
    scores, targets, indices, logits_all, failed = [], [], [], [], []
    for batch in loader:
        failed.extend(batch.failed.tolist())
        if batch.images.shape[0] == 0:
            continue
        x = normalize(accelerator.to_device(batch.images))
        with accelerator.autocast():
            logits = model(x).float().cpu()
        scores.append(probabilities(logits, task).numpy())
        targets.append(batch.targets.numpy())
        indices.append(batch.indices.numpy())
        logits_all.append(logits)
        if on_batch is not None:
            on_batch(batch.images, logits)
    if not scores:
        return np.empty((0,)), np.empty((0,)), np.empty((0,), int), torch.empty(0), failed
    return (np.concatenate(scores), np.concatenate(targets), np.concatenate(indices),
            torch.cat(logits_all), failed)


def evaluate(model: nn.Module, loader: DataLoader, *, criterion: nn.Module,
             accelerator: Accelerator, normalize: nn.Module, task: str, info: DistInfo
             ) -> EvalOutput:
    """Validation over all ranks: gathered, de-duplicated (sampler padding dropped), ordered.

    Images that fail to decode are excluded and listed in `failed`; none decoding is an error.
    """
    scores, targets, indices, logits, failed = predict_scores(
        model, loader, accelerator=accelerator, normalize=normalize, task=task)
    parts = gather_objects(info, (scores, targets, indices, logits, failed))
    merged: dict[int, tuple[np.ndarray, np.ndarray, torch.Tensor]] = {}
    all_failed: set[int] = set()
    for rank_scores, rank_targets, rank_indices, rank_logits, rank_failed in parts:
        all_failed.update(rank_failed)
        for row, i in enumerate(rank_indices.tolist()):  # padding repeats an index: keep one
            merged.setdefault(i, (rank_scores[row], rank_targets[row], rank_logits[row]))
    if not merged:
        raise DataError(f"none of the {len(all_failed)} validation images could be decoded "
                        "(see the warnings above)")
    order = sorted(merged)
    all_scores = np.stack([merged[i][0] for i in order])
    all_targets = np.stack([merged[i][1] for i in order])
    all_logits = torch.stack([merged[i][2] for i in order])
    target_t = torch.as_tensor(all_targets)
    with torch.no_grad():
        loss = float(criterion.cpu()(all_logits, target_t))
    criterion.to(accelerator.device)
    return EvalOutput(scores=all_scores, targets=all_targets, loss=loss,
                      failed=sorted(all_failed), logits=all_logits.numpy())
