"""`fit`: one training run, read top to bottom as its table of contents.

1. prepare: check --output and --weights, pick the device, join the process group, seed,
   resolve the recipe -> the run context (training.context);
2. data: discover, split, datasets and loaders (training.data.load);
3. the learner: network, optimizer, LR schedule, loss (training.loop.train);
4. each epoch: `train_one_epoch`, `evaluate` (temperature-scaled), keep the best, save the
   resume state (training.loop);
5. export: the best epoch as the checkpoint when it is reached, and at the end once more with
   the whole run's record and the unknown-input rule (training.export.checkpoint).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import checkpoint
from models.device import Accelerator
from training import distributed
from training.config import RESUME_FILE, TrainConfig
from training.context import RunContext
from training.data.discovery import infer_task
from training.data.load import load_data, make_loaders
from training.distributed import DistInfo, gather_objects
from training.exceptions import ConfigError, NonFiniteError
from training.export import report
from training.export.checkpoint import Exporter
from training.loop.evaluate import (
    CalibratedOutput,
    calibrate,
    evaluate,
    validation_metrics,
)
from training.loop.metrics import monitor_name, recall_summary
from training.loop.state import (
    Progress,
    capture_rng,
    check_fits_run,
    load_state,
    rank_rng,
    restore_objects,
    restore_rng,
    run_identity,
    save_state,
)
from training.loop.train import EpochStats, build_learner, train_one_epoch
from training.parent import load_parent, names_checkpoint
from training.recipe import resolve
from training.storage import check_output, prepare_output, write_atomically
from training.unknown_rule import fit_unknown_rule

logger = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, Any]], None]


def fit(cfg: TrainConfig, info: DistInfo | None = None,
        on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per `cfg`, export the best epoch into cfg.output, return its validation metrics."""
    info = info or DistInfo()
    try:
        return FitRun(cfg, info, on_epoch_end).run()
    finally:
        distributed.shutdown()


def prepare(cfg: TrainConfig, info: DistInfo) -> RunContext:
    """Check the options' paths, pick this rank's device, join the process group, seed,
    resolve the recipe, and create the output folder."""
    check_output(cfg)
    check_weights_option(cfg)
    parent = load_parent(cfg.weights)
    if parent is not None:
        parent.check_task(infer_task(cfg.data, cfg.task), cfg.data)
    accelerator = Accelerator.create(_training_device(cfg, info), "auto" if cfg.amp else "fp32")
    distributed.init(info, accelerator.device)
    seed_everything(cfg.seed + info.rank)
    run = RunContext(cfg, resolve(cfg), info, accelerator, parent)
    if info.is_main:
        recipe = run.recipe
        logger.info("recipe%s: %s", f" {recipe.name}" if recipe.name else "",
                    ", ".join(f"{k} {v}" for k, v in recipe.to_dict().items() if k != "name"))
        prepare_output(cfg)
    distributed.barrier(info)
    return run


class FitRun:
    """One `fit`: the run context and the objects the epochs share; `run()` drives them."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, on_epoch_end: EpochHook | None = None
                 ) -> None:
        self.on_epoch_end = on_epoch_end
        self.ctx = prepare(cfg, info)
        self.data = load_data(self.ctx)
        self.export = Exporter(self.ctx, self.data)
        self.loaders = make_loaders(self.ctx, self.data)
        self.learner = build_learner(self.ctx, self.data, micro_batches=len(self.loaders.train))
        self.progress = Progress()

    def run(self) -> dict[str, Any]:
        """All epochs (from the resume point), early stopping, the final export."""
        cfg, info, started = self.ctx.cfg, self.ctx.info, time.perf_counter()
        if cfg.resume is not None:
            self.resume(cfg.resume)
            # The clock goes on from where the interrupted run stopped, so the card's
            # `seconds` count the whole run, not only its last part.
            started -= self.progress.elapsed
        for epoch in range(self.progress.epoch, cfg.epochs):
            row = self.run_epoch(epoch, started)
            row["elapsed"] = round(time.perf_counter() - started, 2)
            self.save_state()
            if info.is_main:
                write_atomically(cfg.output / checkpoint.HISTORY_FILE,
                                 report.history_csv(self.progress.history))
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, row)
            if cfg.patience and self.progress.bad_epochs >= cfg.patience:
                logger.info("early stop: no improvement of val_%s for %d epochs",
                            monitor_name(self.data.task), cfg.patience)
                break
        if info.is_main:
            self.finish(time.perf_counter() - started)
        distributed.barrier(info)
        return self.progress.best_metrics

    def run_epoch(self, epoch: int, started: float) -> dict[str, Any]:
        """Train and validate one epoch; export when it is the best so far."""
        stats = self.train(epoch)
        validation = self.validate(epoch)
        metrics, thresholds = validation_metrics(validation, self.data)
        monitor = monitor_name(self.data.task)
        row = report.history_row(epoch, self.learner.optimizer.param_groups[-1]["lr"], stats,
                                 validation, metrics)
        improved = self.progress.record(epoch, row, value=metrics[monitor],
                                        loss=validation.loss, metrics=metrics)
        if improved and self.ctx.info.is_main:
            self.export.best_epoch(
                self.learner.model, validation, thresholds,
                best_metrics=self.progress.best_metrics,
                training=self.training_record(time.perf_counter() - started))
        balanced = (f"  val_balanced_accuracy {metrics['balanced_accuracy']:.4f}"
                    if "balanced_accuracy" in metrics else "")
        logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_%s %.4f%s  %.0f img/s  "
                    "%.1fs%s", epoch + 1, self.ctx.cfg.epochs, stats.loss, validation.loss,
                    monitor, metrics[monitor], balanced, stats.images_per_second, stats.seconds,
                    "  *best" if improved else "")
        return row

    def train(self, epoch: int) -> EpochStats:
        """One epoch of training on every rank, its undecodable images accounted for."""
        self.loaders.train_sampler.set_epoch(epoch)
        stats = train_one_epoch(self.ctx, self.learner, self.loaders.train, epoch)
        self.data.add_train_failures(stats.failed, epoch=epoch, info=self.ctx.info)
        return stats

    def validate(self, epoch: int) -> CalibratedOutput:
        """The validation pass over all ranks, its scores temperature-scaled (the
        temperature fitted on it); a non-finite loss stops the run."""
        validation = evaluate(self.ctx, self.learner, self.loaders.val, task=self.data.task)
        if not math.isfinite(validation.loss):
            raise NonFiniteError(f"the validation loss became {validation.loss} at epoch "
                                 f"{epoch + 1}: the run diverged and was stopped; lower --lr")
        self.data.add_val_failures(validation.failed)
        return calibrate(validation, self.data.task)

    def finish(self, seconds: float) -> None:
        """The best weights back in the model, their unknown-input rule, the final export."""
        cfg, recipe, model = self.ctx.cfg, self.ctx.recipe, self.learner.model
        self.export.restore_best(model)
        rule = fit_unknown_rule(model, cfg.arch, self.data, accelerator=self.ctx.accelerator,
                                normalize=self.learner.normalize,
                                batch_size=2 * recipe.batch_size, workers=cfg.workers,
                                acceptance=cfg.unknown_acceptance)
        self.export.final(model, training=self.training_record(seconds),
                          history=self.progress.history, best_metrics=self.progress.best_metrics,
                          rule=rule)
        logger.info("best val_%s %.4f at epoch %d%s; checkpoint in %s (%.1fs)",
                    monitor_name(self.data.task), self.progress.best_value,
                    self.progress.best_epoch + 1, recall_summary(self.progress.best_metrics),
                    cfg.output, seconds)

    def training_record(self, seconds: float) -> dict[str, Any]:
        """The card's `training` block."""
        run, data = self.ctx, self.data
        return {
            "config": run.cfg.to_dict(), "recipe": run.recipe.to_dict(),
            "dataset": {"train": len(data.train), "val": len(data.val),
                        "root": str(run.cfg.data), "skipped": data.skipped_record()},
            "balance": data.balance,
            "epochs_run": self.progress.epoch, "best_epoch": self.progress.best_epoch + 1,
            "seconds": round(seconds, 2), "device": run.accelerator.describe(),
            "precision": run.accelerator.precision_name, "world_size": run.info.world_size,
        }

    def resume(self, path: Path) -> None:
        """Load model, optimizer, scheduler, scaler, epoch, history and RNG from `path`."""
        info = self.ctx.info
        state = load_state(path)
        check_fits_run(path, state, arch=self.ctx.cfg.arch, classes=self.data.classes,
                       identity=run_identity(self.ctx, self.data))
        restore_objects(path, state, self.learner.stateful())
        self.progress = Progress.from_dict(state["progress"])
        rng = rank_rng(state, info.rank, info.world_size)
        if rng is not None:
            restore_rng(rng["process"])
            self.loaders.train.generator.set_state(rng["loader"])
        else:
            logger.warning("%s was saved by %s processes, this run has %d: random streams "
                           "start afresh", path, state.get("world_size"), info.world_size)
        logger.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", path,
                    self.progress.epoch + 1, monitor_name(self.data.task),
                    self.progress.best_value, self.progress.best_epoch + 1)

    def save_state(self) -> None:
        """Every rank hands in its RNG states; rank 0 writes last.pt."""
        info = self.ctx.info
        rng = gather_objects(info, {"process": capture_rng(),
                                    "loader": self.loaders.train.generator.get_state()})
        if not info.is_main:
            return
        saved = {name: obj.state_dict() for name, obj in self.learner.stateful().items()}
        saved["model"] = {k: v.detach().cpu() for k, v in saved["model"].items()}
        save_state(self.ctx.cfg.output / RESUME_FILE, {
            **saved, "progress": self.progress.to_dict(), "rng": rng,
            "arch": self.ctx.cfg.arch, "classes": self.data.classes,
            "world_size": info.world_size, "identity": run_identity(self.ctx, self.data),
        })


def check_weights_option(cfg: TrainConfig) -> None:
    """A --weights path must name a file or one of our checkpoint folders (another folder
    gets a hint at the file inside)."""
    if cfg.weights in ("imagenet", "none") or names_checkpoint(cfg.weights):
        return
    path = Path(cfg.weights)
    if path.is_dir():
        inside = path / checkpoint.WEIGHTS_FILE
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise ConfigError(f"--weights {path} is a folder, not a .pth/.safetensors file{hint}")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _training_device(cfg: TrainConfig, info: DistInfo) -> str:
    """--device, made this rank's own GPU under torchrun."""
    if info.enabled and cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return cfg.device
