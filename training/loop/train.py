"""Training: the network and what steps it (optimizer, LR schedule, loss), and one epoch over
the training data."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.architectures import build, classifier_parameters
from models.device import Accelerator
from models.preprocessing import Normalize
from training.data.balance import class_counts, class_weights
from training.data.datasets import Batch
from training.distributed import DistInfo, all_reduce_mean
from training.exceptions import NonFiniteError
from training.loop.schedule import LRSchedule, build_scheduler, optimizer_steps
from training.recipe import Recipe

if TYPE_CHECKING:
    from training.context import RunContext
    from training.data.load import TrainingData

logger = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss: float
    images: int
    seconds: float
    failed: set[int] = field(default_factory=set)  # dataset indices that did not decode
    seen: int = 0  # images this rank trained on
    accuracy: float | None = None  # single-label: share right as they were trained on

    @property
    def images_per_second(self) -> float:
        """Training throughput over all ranks."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Learner:
    """What a training step uses: the model, the network that runs it (the model, or DDP
    around it under torchrun), the input normalisation, loss, optimizer, LR schedule and
    gradient scaler."""

    model: nn.Module
    net: nn.Module
    normalize: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRSchedule
    scaler: torch.amp.GradScaler

    def stateful(self) -> dict[str, Any]:
        """The objects whose state dicts a resume state holds, by key."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}


def build_learner(run: RunContext, data: TrainingData, *, micro_batches: int) -> Learner:
    """The network for `data`'s classes on the run's device, and its optimizer, schedule
    (over epochs of `micro_batches` loader batches), loss and scaler."""
    cfg, recipe, accelerator = run.cfg, run.recipe, run.accelerator
    model = accelerator.prepare_model(build_model(run, data))
    net: nn.Module = model
    if run.info.enabled:
        net = DistributedDataParallel(
            model, device_ids=[accelerator.device.index] if accelerator.is_cuda else None)
    optimizer = build_optimizer(model, recipe, arch=cfg.arch)
    scheduler = build_scheduler(
        optimizer, recipe, steps_per_epoch=optimizer_steps(micro_batches, recipe.accumulate),
        epochs=cfg.epochs, freeze_epochs=cfg.freeze_epochs)
    scaler = torch.amp.GradScaler(accelerator.device.type,
                                  enabled=accelerator.amp_dtype == torch.float16)
    criterion = build_criterion(
        data.task, label_smoothing=recipe.label_smoothing, train_targets=data.train.targets(),
        class_weight=loss_class_weights(data), pos_weight=recipe.pos_weight)
    return Learner(model, net, Normalize(data.preprocessing).to(accelerator.device),
                   criterion.to(accelerator.device), optimizer, scheduler, scaler)


def build_model(run: RunContext, data: TrainingData) -> nn.Module:
    """The network for `data`'s classes: from --weights, or carried over from the parent
    checkpoint (training.parent), which must know none of DATA's classes lacks."""
    cfg, parent = run.cfg, run.parent
    if parent is None:
        return build(cfg.arch, num_classes=len(data.classes), weights=cfg.weights,
                     stem=run.recipe.stem)
    parent.check_classes(data.classes, cfg.data)
    model = build(cfg.arch, num_classes=len(data.classes), weights=None, stem=run.recipe.stem)
    parent.carry_into(model, data.classes)
    return model


def loss_class_weights(data: TrainingData) -> torch.Tensor | None:
    """The single-label loss's class weights under --balance loss (None otherwise)."""
    if data.balance != "loss":
        return None
    weights = class_weights(class_counts(data.train.targets(), len(data.classes)))
    logger.info("class weights in the loss: %s", ", ".join(
        f"{c} {w:.3g}" for c, w in zip(data.classes, weights.tolist(), strict=True)))
    return weights



def build_optimizer(model: nn.Module, recipe: Recipe, *, arch: str) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum, with four groups: backbone/head x decay/no-decay (norm
    weights and biases are not decayed)."""
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
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum or 0.0)
    return torch.optim.AdamW(param_groups, lr=recipe.lr, betas=(0.9, 0.999))


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



def train_one_epoch(run: RunContext, learner: Learner, loader: DataLoader, epoch: int
                    ) -> EpochStats:
    """One pass over the training data; returns the mean loss across ranks.

    Every `accumulate` loader batches make one optimizer step: each micro-batch's mean loss is
    divided by the number of micro-batches in its group, so the gradient is that of the whole
    group's mean (exactly, when the micro-batches are of equal size). Images that fail to
    decode are left out of their batch and their indices returned; a loss that is not finite
    stops the run before the optimizer applies it.
    """
    info, accelerator, accumulate = run.info, run.accelerator, run.recipe.accumulate
    model, optimizer, scaler = learner.net, learner.optimizer, learner.scaler
    model.train()
    tally, failed, start = TrainTally(), set(), time.perf_counter()
    micro_batches = len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", file=sys.stderr,
               leave=False, disable=not (run.cfg.progress and info.is_main), dynamic_ncols=True,
               unit="batch")
    optimizer.zero_grad(set_to_none=True)
    pending = False  # gradients accumulated since the last optimizer step
    for index, batch in enumerate(bar):
        failed.update(batch.failed.tolist())
        n = batch.images.shape[0]
        group_start = index - index % accumulate
        group_size = min(accumulate, micro_batches - group_start)
        closes_group = index == group_start + group_size - 1
        if n > 0 or info.enabled:  # alone, a batch with no decodable image is skipped
            with _sync_unless(model, not closes_group):
                with accelerator.autocast():  # the forward only: backward runs outside it
                    loss, logits, targets = _batch_loss(learner, batch, accelerator,
                                                        image_size=run.cfg.image_size)
                value = loss.item()
                _check_finite(value, optimizer, epoch=epoch, step=index)
                scaler.scale(loss / group_size).backward()
            tally.add(value, n, logits, targets)
            pending = True
        if closes_group and pending:
            _optimizer_step(learner, tally, info)
            pending = False
        bar.set_postfix(loss=f"{tally.mean_loss:.4f}",
                        img_s=f"{tally.seen * info.world_size / (time.perf_counter() - start):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    mean_loss = all_reduce_mean(info, tally.mean_loss, tally.seen)
    accuracy = (None if tally.scored == 0 and not info.enabled
                else all_reduce_mean(info, tally.accuracy, tally.scored))
    return EpochStats(loss=mean_loss, images=tally.seen * info.world_size, seconds=seconds,
                      failed=failed, seen=tally.seen,
                      accuracy=accuracy if tally.single_label else None)


class TrainTally:
    """Running loss and (single-label) accuracy of an epoch, and the error of the current
    optimizer step's images (for an error-driven warm-up)."""

    def __init__(self) -> None:
        self.loss_sum, self.seen, self.correct, self.scored = 0.0, 0, 0, 0
        self.step_correct, self.step_scored, self.single_label = 0, 0, False

    def add(self, loss: float, n: int, logits: torch.Tensor | None,
            targets: torch.Tensor | None) -> None:
        """One micro-batch's mean loss over `n` images, and its hits where single-label."""
        self.loss_sum += loss * n
        self.seen += n
        if logits is not None and targets is not None and targets.ndim == 1:
            self.single_label = True
            hits = int((logits.argmax(dim=1) == targets).sum())
            self.correct += hits
            self.scored += n
            self.step_correct += hits
            self.step_scored += n

    def take_step_error(self) -> tuple[float, int]:
        """The error of the images since the last optimizer step, and their count; reset."""
        n = self.step_scored
        error = 1.0 - self.step_correct / n if n else 1.0
        self.step_correct = self.step_scored = 0
        return error, n

    @property
    def mean_loss(self) -> float:
        """Mean training loss so far."""
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        """Share of the scored training images the network got right as it trained on them."""
        return self.correct / self.scored if self.scored else 0.0


def _optimizer_step(learner: Learner, tally: TrainTally, info: DistInfo) -> None:
    """Apply the accumulated gradient, move the schedule on, feed it the step's error."""
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    error, n = tally.take_step_error()
    if learner.scheduler.wants_error:  # all ranks must take the same decision: one error
        learner.scheduler.observe_error(all_reduce_mean(info, error, n))
    learner.scheduler.step()


def _check_finite(value: float, optimizer: torch.optim.Optimizer, *, epoch: int, step: int
                  ) -> None:
    """Stop the run, with what to do, when the loss is not finite."""
    if not math.isfinite(value):
        head_lr = optimizer.param_groups[-1]["lr"]
        raise NonFiniteError(
            f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}: the "
            f"run diverged and was stopped (head LR then {head_lr:.3g}); lower --lr or "
            "--backbone-lr-scale, or try --no-amp")


def _sync_unless(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce is skipped on micro-batches that do not close a group."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _batch_loss(learner: Learner, batch: Batch, accelerator: Accelerator, *, image_size: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The batch's loss, logits and targets; a batch with no decodable image (possible only
    under DDP, where every rank must take part in each step) runs one blank image in eval mode
    at zero weight (no logits then)."""
    if batch.images.shape[0] > 0:
        x = learner.normalize(accelerator.to_device(batch.images))
        y = batch.targets.to(accelerator.device, non_blocking=True)
        logits = learner.net(x).float()
        return learner.criterion(logits, y), logits.detach(), y
    blank = torch.zeros(1, 3, image_size, image_size, device=accelerator.device)
    learner.net.eval()
    try:
        return learner.net(blank).float().sum() * 0.0, None, None
    finally:
        learner.net.train()
