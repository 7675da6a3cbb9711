"""The training step machinery: optimizer, schedule, loss, one epoch, and evaluation."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.architectures import classifier_parameters
from models.device import Runtime
from training.distributed import DistInfo, all_reduce_mean, gather_objects
from training.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalOutput:
    """Validation scores and targets of every sample once, in dataset order, plus the loss."""

    scores: np.ndarray
    targets: np.ndarray
    loss: float


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with four groups: backbone/head x decay/no-decay (norm weights and biases)."""
    head_ids = {id(p) for p in classifier_parameters(model)}
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
    def shape(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def backbone(step: int) -> float:
        return 0.0 if step < freeze_steps else shape(step)

    lambdas = [backbone if g.get("part") == "backbone" else shape
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def build_criterion(task: str, *, label_smoothing: float, train_targets: torch.Tensor
                    ) -> nn.Module:
    """Label-smoothed cross-entropy, or BCE with per-class pos_weight = negatives/positives."""
    if task == "single_label":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    positives = train_targets.sum(dim=0)
    negatives = train_targets.shape[0] - positives
    pos_weight = torch.where(positives > 0, negatives / positives.clamp(min=1),
                             torch.ones_like(positives)).clamp(1.0, 100.0)
    return nn.BCEWithLogitsLoss(pos_weight=pos_weight)


def train_one_epoch(model: nn.Module, loader: DataLoader, *, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: torch.amp.GradScaler, runtime: Runtime, normalize: nn.Module,
                    info: DistInfo, epoch: int, epochs: int, progress: bool) -> EpochStats:
    """One pass over the training data; returns the mean loss across ranks."""
    model.train()
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, leave=False,
               disable=not (progress and info.is_main), dynamic_ncols=True, unit="batch")
    for images, targets, _ in bar:
        x = normalize(runtime.to_device(images))
        y = targets.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = images.shape[0]
        total_loss += loss.item() * n
        seen += n
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.4f}",
                        img_s=f"{seen * info.world_size / elapsed:.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    mean_loss = all_reduce_mean(info, total_loss / max(seen, 1), seen)
    return EpochStats(loss=mean_loss, images=seen * info.world_size, seconds=seconds)


@torch.inference_mode()
def predict_scores(model: nn.Module, loader: DataLoader, *, runtime: Runtime,
                   normalize: nn.Module, task: str,
                   on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Scores, targets, dataset indices and raw logits for this rank's share of `loader`."""
    model.eval()
    scores, targets, indices, logits_all = [], [], [], []
    for images, y, idx in loader:
        x = normalize(runtime.to_device(images))
        with runtime.autocast():
            logits = model(x).float().cpu()
        probs = torch.softmax(logits, 1) if task == "single_label" else torch.sigmoid(logits)
        scores.append(probs.numpy())
        targets.append(y.numpy())
        indices.append(np.asarray(idx))
        logits_all.append(logits)
        if on_batch is not None:
            on_batch(images, logits)
    if not scores:
        return np.empty((0,)), np.empty((0,)), np.empty((0,), int), torch.empty(0)
    return (np.concatenate(scores), np.concatenate(targets), np.concatenate(indices),
            torch.cat(logits_all))


def evaluate(model: nn.Module, loader: DataLoader, *, criterion: nn.Module, runtime: Runtime,
             normalize: nn.Module, task: str, info: DistInfo) -> EvalOutput:
    """Validation over all ranks: gathered, de-duplicated (sampler padding dropped), ordered."""
    scores, targets, indices, logits = predict_scores(
        model, loader, runtime=runtime, normalize=normalize, task=task)
    parts = gather_objects(info, (scores, targets, indices, logits))
    merged: dict[int, tuple[np.ndarray, np.ndarray, torch.Tensor]] = {}
    for s, t, idx, lg in parts:
        for row, i in enumerate(idx.tolist()):
            merged.setdefault(i, (s[row], t[row], lg[row]))
    order = sorted(merged)
    all_scores = np.stack([merged[i][0] for i in order])
    all_targets = np.stack([merged[i][1] for i in order])
    all_logits = torch.stack([merged[i][2] for i in order])
    target_t = torch.as_tensor(all_targets)
    with torch.no_grad():
        loss = float(criterion.cpu()(all_logits, target_t))
    criterion.to(runtime.device)
    return EvalOutput(scores=all_scores, targets=all_targets, loss=loss)
