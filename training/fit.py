"""`fit`: load the data, build the model, run the epochs, keep the best, write the reports."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from models import checkpoint
from models.architectures import build
from models.checkpoint import Preprocessing
from models.device import Runtime
from models.preprocessing import Normalize, eval_transform, train_transform
from training import distributed, report
from training.config import TrainConfig
from training.data import (
    ImageDataset,
    discover,
    make_loader,
    read_split,
    stratified_split,
    write_split,
)
from training.distributed import DistInfo
from training.errors import DataError, ResumeError
from training.export import weights_preprocessing, write_checkpoint
from training.loop import (
    EvalOutput,
    build_criterion,
    build_optimizer,
    build_scheduler,
    evaluate,
    train_one_epoch,
)
from training.metrics import multi_label_metrics, single_label_metrics, summary, tune_thresholds
from training.recipe import Recipe, resolve
from training.state import RESUME_FILE, capture_rng, load_state, restore_rng, save_state

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
EpochHook = Callable[[int, dict[str, Any]], None]


@dataclass
class Data:
    """Training and validation datasets with their shared classes and task."""

    train: ImageDataset
    val: ImageDataset
    classes: list[str]
    task: str


@dataclass
class Progress:
    """What survives an epoch boundary (and a resume)."""

    epoch: int = 0
    best_value: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)


def monitor_name(task: str) -> str:
    """The validation figure that picks the best epoch."""
    return "accuracy" if task == "single_label" else "mAP"


def make_preprocessing(cfg: TrainConfig, recipe: Recipe) -> Preprocessing:
    """The eval preprocessing written to the card (and used for validation)."""
    return Preprocessing.for_crop(cfg.image_size, ratio=recipe.eval_resize_ratio)


def load_data(cfg: TrainConfig, pre: Preprocessing, recipe: Recipe, info: DistInfo) -> Data:
    """Discover, split (or read --val), and wrap both sides in datasets with their transforms."""
    found = discover(cfg.data, task=cfg.task)
    split_path = cfg.output / SPLIT_FILE
    if cfg.val is not None:
        val_set = discover(cfg.val, task=found.task, classes=found.classes)
        train_samples, val_samples = found.samples, val_set.samples
    elif cfg.resume is not None and split_path.is_file():
        train_samples, val_samples = read_split(split_path, found.samples, found.root)
    else:
        train_samples, val_samples = stratified_split(
            found.samples, fraction=cfg.val_fraction, seed=cfg.seed)
        if info.is_main:
            write_split(split_path, found.root, train_samples, val_samples,
                        seed=cfg.seed, fraction=cfg.val_fraction)
    if len(train_samples) < 2:
        raise DataError(f"{cfg.data}: need at least 2 training images, found {len(train_samples)}")
    augment = train_transform(pre, min_scale=recipe.min_scale, hflip=True,
                              trivial_augment=recipe.trivial_augment > 0,
                              augment_probability=recipe.trivial_augment)
    train = ImageDataset(train_samples, found.classes, found.task, augment,
                         decode_size=pre.resize)
    val = ImageDataset(val_samples, found.classes, found.task, eval_transform(pre),
                       decode_size=pre.resize)
    logger.info("data: %d training / %d validation images, %d classes, %s",
                len(train), len(val), len(found.classes), found.task)
    return Data(train, val, found.classes, found.task)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validation_metrics(out: EvalOutput, data: Data) -> tuple[dict[str, Any], list[float] | None]:
    """Full metrics for one validation pass; multi-label thresholds are tuned here."""
    if data.task == "single_label":
        return single_label_metrics(out.scores, out.targets.astype(int), data.classes), None
    thresholds = tune_thresholds(out.scores, out.targets)
    return multi_label_metrics(out.scores, out.targets, data.classes, thresholds), thresholds


class FitRun:
    """One `fit`: holds the objects the epochs share; `run()` drives them."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, on_epoch_end: EpochHook | None = None
                 ) -> None:
        self.cfg, self.info, self.on_epoch_end = cfg, info, on_epoch_end
        device = cfg.device
        if info.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{info.local_rank}"
        self.runtime = Runtime.create(device, "auto" if cfg.amp else "fp32")
        distributed.init(info, self.runtime.device)
        seed_everything(cfg.seed + info.rank)
        ratio = 256 / 224
        if cfg.weights == "imagenet":
            wp = weights_preprocessing(cfg.arch)
            ratio = wp.resize / wp.crop
        self.recipe = resolve(cfg, weights_ratio=ratio)
        self.pre = make_preprocessing(cfg, self.recipe)
        if info.is_main:
            cfg.output.mkdir(parents=True, exist_ok=True)
        distributed.barrier(info)
        self.data = load_data(cfg, self.pre, self.recipe, info)
        self._build_model()
        self._build_loaders()
        self._build_optimization()
        self.progress = Progress()

    def _build_model(self) -> None:
        model = build(self.cfg.arch, num_classes=len(self.data.classes),
                      weights=self.cfg.weights, stem=self.recipe.stem)
        self.model = self.runtime.prepare_model(model)
        self.normalize = Normalize(self.pre).to(self.runtime.device)
        self.net: nn.Module = self.model
        if self.info.enabled:
            ids = [self.runtime.device.index] if self.runtime.is_cuda else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    def _build_loaders(self) -> None:
        cfg, info, bs = self.cfg, self.info, self.recipe.batch_size
        self.train_sampler = DistributedSampler(
            self.data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
            seed=cfg.seed)
        per_rank = len(self.train_sampler)
        pin = self.runtime.is_cuda
        self.train_loader = make_loader(
            self.data.train, batch_size=bs, workers=cfg.workers, shuffle=False, pin_memory=pin,
            sampler=self.train_sampler, seed=cfg.seed, drop_last=per_rank % bs == 1)
        val_sampler = (DistributedSampler(self.data.val, num_replicas=info.world_size,
                                          rank=info.rank, shuffle=False)
                       if info.enabled else None)
        self.val_loader = make_loader(
            self.data.val, batch_size=bs * 2, workers=cfg.workers, shuffle=False, pin_memory=pin,
            sampler=val_sampler)

    def _build_optimization(self) -> None:
        steps = len(self.train_loader)
        self.optimizer = build_optimizer(self.model, self.recipe)
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=steps * self.cfg.epochs,
            warmup_steps=max(1, round(self.recipe.warmup_epochs * steps)),
            freeze_steps=self.cfg.freeze_epochs * steps)
        fp16 = self.runtime.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=fp16)
        self.criterion = build_criterion(
            self.data.task, label_smoothing=self.recipe.label_smoothing,
            train_targets=self.data.train.targets()).to(self.runtime.device)

    def resume(self, path: Path) -> None:
        """Load model, optimizer, scheduler, scaler, epoch, history and RNG from `path`."""
        state = load_state(path)
        if state.get("classes") != self.data.classes or state.get("arch") != self.cfg.arch:
            raise ResumeError(f"{path}: saved for {state.get('arch')} with classes "
                              f"{state.get('classes')!r:.80}, not this run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        p = state["progress"]
        self.progress = Progress(epoch=p["epoch"], best_value=p["best_value"],
                                 best_loss=p["best_loss"], best_epoch=p["best_epoch"],
                                 bad_epochs=p["bad_epochs"], history=list(p["history"]),
                                 best_metrics=p["best_metrics"])
        if self.info.world_size == state.get("world_size", 1):
            restore_rng(state["rng"])
        logger.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", path,
                    self.progress.epoch + 1, monitor_name(self.data.task),
                    self.progress.best_value, self.progress.best_epoch + 1)

    def _save_state(self) -> None:
        p = self.progress
        save_state(self.cfg.output / RESUME_FILE, {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {"epoch": p.epoch, "best_value": p.best_value, "best_loss": p.best_loss,
                         "best_epoch": p.best_epoch, "bad_epochs": p.bad_epochs,
                         "history": p.history, "best_metrics": p.best_metrics},
            "rng": capture_rng(), "arch": self.cfg.arch, "classes": self.data.classes,
            "world_size": self.info.world_size,
        })

    def training_record(self, seconds: float) -> dict[str, Any]:
        """The card's `training` block."""
        return {
            "config": self.cfg.to_dict(), "recipe": self.recipe.to_dict(),
            "dataset": {"train": len(self.data.train), "val": len(self.data.val),
                        "root": str(self.cfg.data)},
            "epochs_run": self.progress.epoch, "best_epoch": self.progress.best_epoch + 1,
            "seconds": round(seconds, 2), "device": self.runtime.describe(),
            "precision": self.runtime.precision_name, "world_size": self.info.world_size,
        }

    def _export(self, thresholds: list[float] | None, out: EvalOutput, seconds: float) -> None:
        metrics = self.progress.best_metrics
        card_metrics = {**summary(metrics), "epoch": self.progress.best_epoch + 1,
                        "split": "validation"}
        write_checkpoint(
            self.cfg.output, self.model, name=self.cfg.output.name, arch=self.cfg.arch,
            task=self.data.task, classes=self.data.classes, preprocessing=self.pre,
            stem=self.recipe.stem, thresholds=thresholds, metrics=card_metrics,
            training=self.training_record(seconds))
        report.write_metrics(self.cfg.output / "metrics.json", metrics)
        if self.data.task == "single_label":
            report.plot_confusion(self.cfg.output / "confusion_matrix.png",
                                  metrics["confusion_matrix"], self.data.classes)
        else:
            report.plot_pr_curves(self.cfg.output / "pr_curves.png", out.scores, out.targets,
                                  self.data.classes, thresholds or [])

    def run_epoch(self, epoch: int, started: float) -> dict[str, Any]:
        """Train and validate one epoch; export when it is the best so far."""
        self.train_sampler.set_epoch(epoch)
        stats = train_one_epoch(
            self.net, self.train_loader, criterion=self.criterion, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, runtime=self.runtime,
            normalize=self.normalize, info=self.info, epoch=epoch, epochs=self.cfg.epochs,
            progress=self.cfg.progress)
        out = evaluate(self.model, self.val_loader, criterion=self.criterion,
                       runtime=self.runtime, normalize=self.normalize, task=self.data.task,
                       info=self.info)
        metrics, thresholds = validation_metrics(out, self.data)
        name = monitor_name(self.data.task)
        value, p = metrics[name], self.progress
        improved = value > p.best_value + 1e-9 or (abs(value - p.best_value) <= 1e-9
                                                   and out.loss < p.best_loss)
        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[-1]["lr"],
               "train_loss": round(stats.loss, 5), "val_loss": round(out.loss, 5),
               **{f"val_{k}": round(v, 5) for k, v in summary(metrics).items()
                  if k != "num_samples"},
               "images_per_second": round(stats.images_per_second, 1),
               "seconds": round(stats.seconds, 2)}
        p.history.append(row)
        p.epoch = epoch + 1
        if improved:
            p.best_value, p.best_loss, p.best_epoch, p.bad_epochs = value, out.loss, epoch, 0
            p.best_metrics = {**metrics, "loss": out.loss, "epoch": epoch + 1}
            if self.info.is_main:
                self._export(thresholds, out, time.perf_counter() - started)
        else:
            p.bad_epochs += 1
        logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_%s %.4f  %.0f img/s  "
                    "%.1fs%s", epoch + 1, self.cfg.epochs, stats.loss, out.loss, name, value,
                    stats.images_per_second, stats.seconds, "  *best" if improved else "")
        return row

    def run(self) -> dict[str, Any]:
        """All epochs (from the resume point), early stopping, final card and reports."""
        cfg, started = self.cfg, time.perf_counter()
        if cfg.resume is not None:
            self.resume(cfg.resume)
            started -= self.progress.history[-1:][0].get("elapsed", 0) if \
                self.progress.history else 0
        for epoch in range(self.progress.epoch, cfg.epochs):
            row = self.run_epoch(epoch, started)
            row["elapsed"] = round(time.perf_counter() - started, 2)
            if self.info.is_main:
                self._save_state()
                report.write_history(cfg.output / "history.csv", self.progress.history)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, row)
            if cfg.patience and self.progress.bad_epochs >= cfg.patience:
                logger.info("early stop: no improvement of val_%s for %d epochs",
                            monitor_name(self.data.task), cfg.patience)
                break
        if self.info.is_main:
            self._finish(time.perf_counter() - started)
        distributed.barrier(self.info)
        return self.progress.best_metrics

    def _finish(self, seconds: float) -> None:
        """Rewrite the best checkpoint's card with the whole run's record; draw the curves."""
        out_dir = self.cfg.output
        best = load_file(str(out_dir / checkpoint.WEIGHTS_FILE))
        self.model.load_state_dict(best)
        card = checkpoint.read_card(out_dir)
        write_checkpoint(out_dir, self.model, name=card.name, arch=card.arch, task=card.task,
                         classes=card.classes, preprocessing=card.preprocessing, stem=card.stem,
                         thresholds=card.thresholds, metrics=card.metrics,
                         training=self.training_record(seconds))
        report.plot_curves(out_dir / "curves.png", self.progress.history,
                           monitor_name(self.data.task))
        logger.info("best val_%s %.4f at epoch %d; checkpoint in %s (%.1fs)",
                    monitor_name(self.data.task), self.progress.best_value,
                    self.progress.best_epoch + 1, out_dir, seconds)


def fit(cfg: TrainConfig, info: DistInfo | None = None,
        on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per `cfg`, export the best epoch into cfg.output, return its validation metrics."""
    info = info or DistInfo()
    try:
        return FitRun(cfg, info, on_epoch_end).run()
    finally:
        distributed.shutdown()
