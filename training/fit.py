"""`fit`: load the data, build the model, run the epochs, keep the best, write the reports.

One epoch is `train_one_epoch` then `evaluate` (training.loop); the data is training.fit_data,
the resume state training.state, and the checkpoint and its reports training.export.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models import checkpoint
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.checkpoint import HISTORY_FILE
from models.device import Accelerator
from models.preprocessing import Normalize
from training import distributed
from training.config import RESUME_FILE, TrainConfig
from training.data.balance import class_counts, class_weights
from training.data.load import DecodeFailures, load_data, make_loaders, measure_mean_std
from training.distributed import DistInfo, gather_objects
from training.exceptions import ConfigError, DataError, NonFiniteError
from training.export import report
from training.export.checkpoint import (
    PER_EXPORT_REPORTS,
    card_metrics,
    finish_checkpoint,
    validation_reports,
    write_checkpoint,
)
from training.export.drift import write_drift_reference
from training.export.report import history_row
from training.loop.evaluate import (
    CalibratedOutput,
    calibrate,
    card_calibration,
    evaluate,
    validation_metrics,
)
from training.loop.metrics import monitor_name, recall_summary
from training.loop.schedule import build_scheduler, optimizer_steps
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
from training.loop.train import EpochStats, build_criterion, build_optimizer, train_one_epoch
from training.recipe import Recipe, resolve
from training.storage import check_output, prepare_output, write_atomically, write_errors
from training.unknown_rule import UnknownRule, fit_unknown_rule

logger = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, Any]], None]


def make_preprocessing(cfg: TrainConfig, recipe: Recipe) -> Preprocessing:
    """The eval preprocessing written to the card (and used for validation)."""
    return Preprocessing.for_crop(cfg.image_size, ratio=recipe.eval_resize_ratio)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_weights_option(cfg: TrainConfig) -> None:
    """A --weights path must name a file (a folder gets a hint at the file inside)."""
    if cfg.weights in ("imagenet", "none"):
        return
    path = Path(cfg.weights)
    if path.is_dir():
        inside = path / checkpoint.WEIGHTS_FILE
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise ConfigError(f"--weights {path} is a folder, not a .pth/.safetensors file{hint}")


def _training_device(cfg: TrainConfig, info: DistInfo) -> str:
    """--device, made this rank's own GPU under torchrun."""
    if info.enabled and cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return cfg.device


class FitRun:
    """One `fit`: holds the objects the epochs share; `run()` drives them."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, on_epoch_end: EpochHook | None = None
                 ) -> None:
        self.cfg, self.info, self.on_epoch_end = cfg, info, on_epoch_end
        check_output(cfg)
        check_weights_option(cfg)
        self.accelerator = Accelerator.create(_training_device(cfg, info),
                                      "auto" if cfg.amp else "fp32")
        distributed.init(info, self.accelerator.device)
        seed_everything(cfg.seed + info.rank)
        self.recipe = resolve(cfg)
        if info.is_main:
            logger.info("recipe%s: %s", f" {self.recipe.name}" if self.recipe.name else "",
                        ", ".join(f"{k} {v}" for k, v in self.recipe.to_dict().items()
                                  if k != "name"))
        self.preprocessing = make_preprocessing(cfg, self.recipe)
        if info.is_main:
            prepare_output(cfg)
        distributed.barrier(info)
        self.data = load_data(cfg, self.preprocessing, self.recipe, info)
        if self.recipe.normalize == "dataset":
            mean, std = measure_mean_std(self.data, info, batch_size=2 * self.recipe.batch_size,
                                         workers=cfg.workers)
            self.preprocessing = dataclasses.replace(self.preprocessing, mean=mean, std=std)
        self._check_card_fields()
        self._build_model()
        self.train_sampler, self.train_loader, self.val_loader = make_loaders(
            self.data, cfg, self.recipe.batch_size, info, pin_memory=self.accelerator.is_cuda)
        self._build_optimization()
        self.progress = Progress()
        self.failures = DecodeFailures()

    @property
    def name(self) -> str:
        """The checkpoint's name: the output folder's."""
        return self.cfg.output.resolve().name

    @property
    def identity(self) -> dict[str, Any]:
        """What a resume state must match (training.state.run_identity)."""
        return run_identity(self.cfg, self.recipe, task=self.data.task, split=self.data.split)

    def _check_card_fields(self) -> None:
        """Fail before training, not after it, when the card could not hold these values."""
        try:
            ModelCard(name=self.name, arch=self.cfg.arch, task=self.data.task,
                      classes=self.data.classes, preprocessing=self.preprocessing,
                      stem=self.recipe.stem)
        except ValueError as exc:
            raise DataError(f"{self.cfg.data}: cannot be written into a checkpoint card: "
                            f"{exc}") from exc

    def _build_model(self) -> None:
        model = build(self.cfg.arch, num_classes=len(self.data.classes),
                      weights=self.cfg.weights, stem=self.recipe.stem)
        self.model = self.accelerator.prepare_model(model)
        self.normalize = Normalize(self.preprocessing).to(self.accelerator.device)
        self.net: nn.Module = self.model
        if self.info.enabled:
            ids = [self.accelerator.device.index] if self.accelerator.is_cuda else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    def _build_optimization(self) -> None:
        self.optimizer = build_optimizer(self.model, self.recipe, arch=self.cfg.arch)
        self.scheduler = build_scheduler(
            self.optimizer, self.recipe,
            steps_per_epoch=optimizer_steps(len(self.train_loader), self.recipe.accumulate),
            epochs=self.cfg.epochs, freeze_epochs=self.cfg.freeze_epochs)
        fp16 = self.accelerator.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.accelerator.device.type, enabled=fp16)
        self.criterion = build_criterion(
            self.data.task, label_smoothing=self.recipe.label_smoothing,
            train_targets=self.data.train.targets(), class_weight=self._class_weight(),
            pos_weight=self.recipe.pos_weight).to(self.accelerator.device)

    def _class_weight(self) -> torch.Tensor | None:
        """The single-label loss's class weights under --balance loss (None otherwise)."""
        if self.data.balance != "loss":
            return None
        weights = class_weights(class_counts(self.data.train.targets(), len(self.data.classes)))
        logger.info("class weights in the loss: %s", ", ".join(
            f"{c} {w:.3g}" for c, w in zip(self.data.classes, weights.tolist(), strict=True)))
        return weights

    def _stateful(self) -> dict[str, Any]:
        """The objects whose state dicts a resume state holds, by key."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}

    def resume(self, path: Path) -> None:
        """Load model, optimizer, scheduler, scaler, epoch, history and RNG from `path`."""
        state = load_state(path)
        check_fits_run(path, state, arch=self.cfg.arch, classes=self.data.classes,
                       identity=self.identity)
        restore_objects(path, state, self._stateful())
        self.progress = Progress.from_dict(state["progress"])
        rng = rank_rng(state, self.info.rank, self.info.world_size)
        if rng is not None:
            restore_rng(rng["process"])
            self.train_loader.generator.set_state(rng["loader"])
        else:
            logger.warning("%s was saved by %s processes, this run has %d: random streams "
                           "start afresh", path, state.get("world_size"), self.info.world_size)
        logger.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", path,
                    self.progress.epoch + 1, monitor_name(self.data.task),
                    self.progress.best_value, self.progress.best_epoch + 1)

    def _save_state(self) -> None:
        """Every rank hands in its RNG states; rank 0 writes last.pt."""
        rng = gather_objects(self.info, {"process": capture_rng(),
                                         "loader": self.train_loader.generator.get_state()})
        if not self.info.is_main:
            return
        saved = {name: obj.state_dict() for name, obj in self._stateful().items()}
        saved["model"] = {k: v.detach().cpu() for k, v in saved["model"].items()}
        save_state(self.cfg.output / RESUME_FILE, {
            **saved, "progress": self.progress.to_dict(), "rng": rng, "arch": self.cfg.arch,
            "classes": self.data.classes, "world_size": self.info.world_size,
            "identity": self.identity,
        })

    def training_record(self, seconds: float) -> dict[str, Any]:
        """The card's `training` block."""
        return {
            "config": self.cfg.to_dict(), "recipe": self.recipe.to_dict(),
            "dataset": {"train": len(self.data.train), "val": len(self.data.val),
                        "root": str(self.cfg.data),
                        "skipped": self.failures.record(self.data, self.cfg.data)},
            "balance": self.data.balance,
            "epochs_run": self.progress.epoch, "best_epoch": self.progress.best_epoch + 1,
            "seconds": round(seconds, 2), "device": self.accelerator.describe(),
            "precision": self.accelerator.precision_name, "world_size": self.info.world_size,
        }

    def _export(self, thresholds: list[float] | None, validation: CalibratedOutput,
                seconds: float) -> None:
        """Write the best epoch so far as the checkpoint, with its report files."""
        best = self.progress.best_metrics
        reports = validation_reports(self.data.task, best, self.data.classes,
                                     scores=validation.scores, targets=validation.targets,
                                     thresholds=thresholds)
        with write_errors(self.cfg.output):
            write_checkpoint(
                self.cfg.output, self.model, name=self.name, arch=self.cfg.arch,
                task=self.data.task, classes=self.data.classes, preprocessing=self.preprocessing,
                stem=self.recipe.stem, thresholds=thresholds, metrics=card_metrics(best),
                training=self.training_record(seconds), reports=reports,
                replaces=PER_EXPORT_REPORTS,
                calibration=card_calibration(validation.calibration))

    def _train(self, epoch: int) -> EpochStats:
        """One epoch of training on every rank, its undecodable images accounted for."""
        self.train_sampler.set_epoch(epoch)
        stats = train_one_epoch(
            self.net, self.train_loader, criterion=self.criterion, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, accelerator=self.accelerator,
            normalize=self.normalize, info=self.info, epoch=epoch, epochs=self.cfg.epochs,
            progress=self.cfg.progress, image_size=self.preprocessing.crop,
            accumulate=self.recipe.accumulate)
        self.failures.add_train(stats.failed, epoch=epoch, data=self.data, info=self.info,
                                data_root=self.cfg.data)
        return stats

    def _validate(self, epoch: int) -> CalibratedOutput:
        """The validation pass over all ranks, its scores temperature-scaled (the
        temperature fitted on it); a non-finite loss stops the run."""
        validation = evaluate(self.model, self.val_loader, criterion=self.criterion,
                              accelerator=self.accelerator, normalize=self.normalize,
                              task=self.data.task, info=self.info)
        if not math.isfinite(validation.loss):
            raise NonFiniteError(f"the validation loss became {validation.loss} at epoch "
                                 f"{epoch + 1}: the run diverged and was stopped; lower --lr")
        self.failures.add_val(validation.failed)
        return calibrate(validation, self.data.task)

    def _unknown_rule(self, model: nn.Module) -> UnknownRule | None:
        """The unknown-input rule of the best weights (loaded into `model`)."""
        return fit_unknown_rule(model, self.cfg.arch, self.data, accelerator=self.accelerator,
                                normalize=self.normalize, batch_size=2 * self.recipe.batch_size,
                                workers=self.cfg.workers)

    def run_epoch(self, epoch: int, started: float) -> dict[str, Any]:
        """Train and validate one epoch; export when it is the best so far."""
        stats = self._train(epoch)
        validation = self._validate(epoch)
        metrics, thresholds = validation_metrics(validation, self.data)
        monitor = monitor_name(self.data.task)
        value = metrics[monitor]
        row = history_row(epoch, self.optimizer.param_groups[-1]["lr"], stats, validation,
                          metrics)
        improved = self.progress.record(epoch, row, value=value, loss=validation.loss,
                                        metrics=metrics)
        if improved and self.info.is_main:
            self._export(thresholds, validation, time.perf_counter() - started)
        balanced = (f"  val_balanced_accuracy {metrics['balanced_accuracy']:.4f}"
                    if "balanced_accuracy" in metrics else "")
        logger.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_%s %.4f%s  %.0f img/s  "
                    "%.1fs%s", epoch + 1, self.cfg.epochs, stats.loss, validation.loss, monitor,
                    value, balanced, stats.images_per_second, stats.seconds,
                    "  *best" if improved else "")
        return row

    def run(self) -> dict[str, Any]:
        """All epochs (from the resume point), early stopping, final card and reports."""
        cfg, started = self.cfg, time.perf_counter()
        if cfg.resume is not None:
            self.resume(cfg.resume)
            # The clock goes on from where the interrupted run stopped, so the card's
            # `seconds` count the whole run, not only its last part.
            started -= self.progress.elapsed
        for epoch in range(self.progress.epoch, cfg.epochs):
            row = self.run_epoch(epoch, started)
            row["elapsed"] = round(time.perf_counter() - started, 2)
            self._save_state()
            if self.info.is_main:
                write_atomically(cfg.output / HISTORY_FILE,
                                 report.history_csv(self.progress.history))
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
        monitor = monitor_name(self.data.task)
        finish_checkpoint(self.cfg.output, self.model, training=self.training_record(seconds),
                          history=self.progress.history, monitor=monitor,
                          unknown_rule=self._unknown_rule,
                          best_metrics=self.progress.best_metrics)
        write_drift_reference(self.cfg.output, self.data.val, accelerator=self.accelerator,
                              batch_size=2 * self.recipe.batch_size, workers=self.cfg.workers)
        logger.info("best val_%s %.4f at epoch %d%s; checkpoint in %s (%.1fs)", monitor,
                    self.progress.best_value, self.progress.best_epoch + 1,
                    recall_summary(self.progress.best_metrics), self.cfg.output, seconds)


def fit(cfg: TrainConfig, info: DistInfo | None = None,
        on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per `cfg`, export the best epoch into cfg.output, return its validation metrics."""
    info = info or DistInfo()
    try:
        return FitRun(cfg, info, on_epoch_end).run()
    finally:
        distributed.shutdown()
