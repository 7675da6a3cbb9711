"""`fit`: load the data, build the model, run the epochs, keep the best, write the reports."""

from __future__ import annotations

import logging
import math
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
from models.checkpoint import ModelCard, Preprocessing
from models.device import Runtime
from models.preprocessing import Normalize, eval_transform, train_transform
from training import distributed, report
from training.config import TrainConfig
from training.data import (
    ImageDataset,
    Sample,
    SampleSet,
    classes_without,
    discover,
    make_loader,
    read_split,
    sample_key,
    split_digest,
    split_payload,
    stratified_split,
)
from training.distributed import DistInfo, gather_objects
from training.errors import ConfigError, DataError, NonFiniteError, OutputError, ResumeError
from training.export import weights_preprocessing, write_checkpoint
from training.loop import (
    EvalOutput,
    build_criterion,
    build_optimizer,
    build_scheduler,
    evaluate,
    train_one_epoch,
)
from training.metrics import (
    held_out_multi_label_metrics,
    single_label_metrics,
    summary,
)
from training.recipe import Recipe, resolve
from training.state import (
    RESUME_FILE,
    capture_rng,
    check_identity,
    load_state,
    rank_rng,
    restore_rng,
    save_state,
)
from training.storage import remove_stale_temps, write_atomically, write_errors

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
# Written with each exported checkpoint (curves.png at the end of the run), never carried over.
REPORT_FILES = ("metrics.json", "confusion_matrix.png", "pr_curves.png", "curves.png")
CHECKPOINT_FILES = (checkpoint.CARD_FILE, checkpoint.WEIGHTS_FILE, RESUME_FILE)
EXAMPLES = 20  # skipped images named in the card
EpochHook = Callable[[int, dict[str, Any]], None]


@dataclass
class Data:
    """Training and validation datasets with their shared classes, task and split record."""

    train: ImageDataset
    val: ImageDataset
    classes: list[str]
    task: str
    split: dict[str, Any] = field(default_factory=dict)  # sha256, sizes, where it came from
    unusable: list[tuple[Path, str]] = field(default_factory=list)  # skipped at discovery


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


def check_output(cfg: TrainConfig) -> None:
    """Refuse an --output that is a file, or that holds a checkpoint this run would replace."""
    out = cfg.output
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file; it must be a folder (new or existing)")
    if cfg.resume is not None or cfg.overwrite or not out.is_dir():
        return
    held = [name for name in CHECKPOINT_FILES if (out / name).exists()]
    if held:
        raise OutputError(f"--output {out} already holds a checkpoint ({', '.join(held)}); pass "
                          "--overwrite to replace it, --resume to continue its run, or choose "
                          "another folder")


def check_weights_option(cfg: TrainConfig) -> None:
    """A --weights path must name a file (a folder gets a hint at the file inside)."""
    if cfg.weights in ("imagenet", "none"):
        return
    path = Path(cfg.weights)
    if path.is_dir():
        inside = path / checkpoint.WEIGHTS_FILE
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise ConfigError(f"--weights {path} is a folder, not a .pth/.safetensors file{hint}")


def _split(cfg: TrainConfig, found: SampleSet, info: DistInfo
           ) -> tuple[list[Sample], list[Sample], Path, str]:
    """Train and validation samples, the validation root, and where the split came from."""
    split_path = cfg.output / SPLIT_FILE
    if cfg.val is not None:
        val_set = discover(cfg.val, task=found.task, classes=found.classes,
                           max_pixels=cfg.max_pixels)
        found.skipped.extend(val_set.skipped)
        return found.samples, val_set.samples, val_set.root, f"--val {cfg.val}"
    if cfg.resume is not None and split_path.is_file():
        train, val = read_split(split_path, found.samples, found.root)
        return train, val, found.root, str(split_path)
    train, val = stratified_split(found.samples, fraction=cfg.val_fraction, seed=cfg.seed)
    if info.is_main:
        write_atomically(split_path, split_payload(found.root, train, val, seed=cfg.seed,
                                                   fraction=cfg.val_fraction))
    return train, val, found.root, f"a new split (seed {cfg.seed})"


def load_data(cfg: TrainConfig, pre: Preprocessing, recipe: Recipe, info: DistInfo) -> Data:
    """Discover, split (or read --val), and wrap both sides in datasets with their transforms."""
    found = discover(cfg.data, task=cfg.task, max_pixels=cfg.max_pixels)
    train_samples, val_samples, val_root, source = _split(cfg, found, info)
    if len(train_samples) < 2:
        raise DataError(f"{cfg.data}: need at least 2 training images, found {len(train_samples)}")
    for name in classes_without(val_samples, found.classes):
        logger.warning("class %r has no validation image (too few images to split off one); "
                       "its validation figures are empty: add images or pass --val", name)
    augment = train_transform(pre, min_scale=recipe.min_scale, hflip=True,
                              trivial_augment=recipe.trivial_augment > 0,
                              augment_probability=recipe.trivial_augment)
    train = ImageDataset(train_samples, found.classes, found.task, augment,
                         decode_size=pre.resize, max_pixels=cfg.max_pixels)
    val = ImageDataset(val_samples, found.classes, found.task, eval_transform(pre),
                       decode_size=pre.resize, max_pixels=cfg.max_pixels)
    logger.info("data: %d training / %d validation images, %d classes, %s",
                len(train), len(val), len(found.classes), found.task)
    split = {"sha256": split_digest(train_samples, found.root, val_samples, val_root),
             "train": len(train), "val": len(val), "source": source}
    return Data(train, val, found.classes, found.task, split, found.skipped)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validation_metrics(out: EvalOutput, data: Data) -> tuple[dict[str, Any], list[float] | None]:
    """Full metrics for one validation pass; multi-label thresholds are tuned here (F1 is
    scored on images the thresholds were not tuned on)."""
    if data.task == "single_label":
        metrics, thresholds = single_label_metrics(
            out.scores, out.targets.astype(int), data.classes), None
    else:
        metrics, thresholds = held_out_multi_label_metrics(out.scores, out.targets,
                                                           data.classes)
    metrics["excluded"] = len(out.failed)
    return metrics, thresholds


class FitRun:
    """One `fit`: holds the objects the epochs share; `run()` drives them."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, on_epoch_end: EpochHook | None = None
                 ) -> None:
        self.cfg, self.info, self.on_epoch_end = cfg, info, on_epoch_end
        check_output(cfg)
        check_weights_option(cfg)
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
        self._prepare_output()
        self.data = load_data(cfg, self.pre, self.recipe, info)
        self._check_card_fields()
        self._build_model()
        self._build_loaders()
        self._build_optimization()
        self.progress = Progress()
        self.failed_train: set[int] = set()
        self.failed_val: set[int] = set()

    @property
    def name(self) -> str:
        """The checkpoint's name: the output folder's."""
        return self.cfg.output.resolve().name

    def _prepare_output(self) -> None:
        """Create the output folder, clear what killed writes left, drop a replaced state."""
        cfg = self.cfg
        if self.info.is_main:
            with write_errors(cfg.output):
                cfg.output.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(cfg.output)
                if cfg.overwrite and (cfg.output / RESUME_FILE).exists():
                    (cfg.output / RESUME_FILE).unlink()
                    logger.info("--overwrite: removed the previous run's %s", RESUME_FILE)
        distributed.barrier(self.info)

    def _check_card_fields(self) -> None:
        """Fail before training, not after it, when the card could not hold these values."""
        try:
            ModelCard(name=self.name, arch=self.cfg.arch, task=self.data.task,
                      classes=self.data.classes, preprocessing=self.pre, stem=self.recipe.stem)
        except ValueError as exc:
            raise DataError(f"{self.cfg.data}: cannot be written into a checkpoint card: "
                            f"{exc}") from exc

    @property
    def identity(self) -> dict[str, Any]:
        """What a resume state must match: the options that shape the run, and the split."""
        cfg = self.cfg
        options = {"task": self.data.task, "arch": cfg.arch, "weights": cfg.weights,
                   "image_size": cfg.image_size, "epochs": cfg.epochs,
                   "freeze_epochs": cfg.freeze_epochs, "seed": cfg.seed,
                   "val": None if cfg.val is None else str(cfg.val),
                   "val_fraction": cfg.val_fraction, "max_pixels": cfg.max_pixels,
                   **self.recipe.to_dict()}
        return {"options": options, "split": dict(self.data.split)}

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
        # The sampler's seed is shared (one permutation split across ranks); the loader's is
        # per rank, so each rank's workers draw their own augmentation stream.
        self.train_sampler = DistributedSampler(
            self.data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True,
            seed=cfg.seed)
        per_rank = len(self.train_sampler)
        pin = self.runtime.is_cuda
        self.train_loader = make_loader(
            self.data.train, batch_size=bs, workers=cfg.workers, shuffle=False, pin_memory=pin,
            sampler=self.train_sampler, seed=cfg.seed + info.rank,
            drop_last=per_rank % bs == 1)
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
        check_identity(path, state, self.identity)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ResumeError(f"{path}: does not fit this run ({first})") from exc
        p = state["progress"]
        self.progress = Progress(epoch=p["epoch"], best_value=p["best_value"],
                                 best_loss=p["best_loss"], best_epoch=p["best_epoch"],
                                 bad_epochs=p["bad_epochs"], history=list(p["history"]),
                                 best_metrics=p["best_metrics"])
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
        p = self.progress
        save_state(self.cfg.output / RESUME_FILE, {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {"epoch": p.epoch, "best_value": p.best_value, "best_loss": p.best_loss,
                         "best_epoch": p.best_epoch, "bad_epochs": p.bad_epochs,
                         "history": p.history, "best_metrics": p.best_metrics},
            "rng": rng, "arch": self.cfg.arch, "classes": self.data.classes,
            "world_size": self.info.world_size, "identity": self.identity,
        })

    def _skipped_record(self) -> dict[str, Any]:
        """The card's account of images left out: unusable at discovery, failed to decode."""
        train = [self.data.train.samples[i].path for i in sorted(self.failed_train)]
        val = [self.data.val.samples[i].path for i in sorted(self.failed_val)]
        named = [*(p for p, _ in self.data.unusable), *train, *val]
        return {"unusable": len(self.data.unusable), "train_undecodable": len(train),
                "val_undecodable": len(val),
                "examples": [sample_key(p, self.cfg.data if self.cfg.data.is_dir()
                                        else self.cfg.data.parent) for p in named[:EXAMPLES]]}

    def training_record(self, seconds: float) -> dict[str, Any]:
        """The card's `training` block."""
        return {
            "config": self.cfg.to_dict(), "recipe": self.recipe.to_dict(),
            "dataset": {"train": len(self.data.train), "val": len(self.data.val),
                        "root": str(self.cfg.data), "skipped": self._skipped_record()},
            "epochs_run": self.progress.epoch, "best_epoch": self.progress.best_epoch + 1,
            "seconds": round(seconds, 2), "device": self.runtime.describe(),
            "precision": self.runtime.precision_name, "world_size": self.info.world_size,
        }

    def _export(self, thresholds: list[float] | None, out: EvalOutput, seconds: float) -> None:
        metrics, classes = self.progress.best_metrics, self.data.classes
        card_metrics = {**summary(metrics), "epoch": self.progress.best_epoch + 1,
                        "split": "validation"}
        if "f1_thresholds" in metrics:
            card_metrics["f1_thresholds"] = metrics["f1_thresholds"]
        reports: dict[str, Callable[[Path], None]] = {
            "metrics.json": lambda p: report.write_metrics(p, metrics)}
        if self.data.task == "single_label":
            reports["confusion_matrix.png"] = lambda p: report.plot_confusion(
                p, metrics["confusion_matrix"], classes)
        else:
            reports["pr_curves.png"] = lambda p: report.plot_pr_curves(
                p, out.scores, out.targets, classes, thresholds or [])
        with write_errors(self.cfg.output):
            write_checkpoint(
                self.cfg.output, self.model, name=self.name, arch=self.cfg.arch,
                task=self.data.task, classes=classes, preprocessing=self.pre,
                stem=self.recipe.stem, thresholds=thresholds, metrics=card_metrics,
                training=self.training_record(seconds), reports=reports,
                replaces=REPORT_FILES)

    def _account_train_failures(self, failed: set[int], epoch: int) -> None:
        """Record this epoch's undecodable training images (all ranks); refuse a run in which
        a class has no decodable training image left."""
        new = set().union(*gather_objects(self.info, failed)) - self.failed_train
        self.failed_train |= new
        if new:
            logger.warning("epoch %d: %d training images could not be decoded and were "
                           "skipped with their labels (%d in all)", epoch + 1, len(new),
                           len(self.failed_train))
        if not self.failed_train:
            return
        usable = [s for i, s in enumerate(self.data.train.samples) if i not in self.failed_train]
        if not usable:
            raise DataError(f"{self.cfg.data}: none of the {len(self.failed_train)} training "
                            "images could be decoded (see the warnings above)")
        unseen = classes_without(usable, self.data.classes)
        if unseen:
            total = sum(unseen[0] in s.labels for s in self.data.train.samples)
            raise DataError(f"{self.cfg.data}: class {unseen[0]!r} has no decodable training "
                            f"image (all {total} failed, see the warnings above); the model "
                            "would never see it")

    def _account_val_failures(self, out: EvalOutput) -> None:
        new = set(out.failed) - self.failed_val
        self.failed_val |= new
        if new:
            logger.warning("%d validation images could not be decoded and are excluded from "
                           "the metrics (%d in all)", len(new), len(self.failed_val))

    def run_epoch(self, epoch: int, started: float) -> dict[str, Any]:
        """Train and validate one epoch; export when it is the best so far."""
        self.train_sampler.set_epoch(epoch)
        stats = train_one_epoch(
            self.net, self.train_loader, criterion=self.criterion, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, runtime=self.runtime,
            normalize=self.normalize, info=self.info, epoch=epoch, epochs=self.cfg.epochs,
            progress=self.cfg.progress, image_size=self.pre.crop)
        self._account_train_failures(stats.failed, epoch)
        out = evaluate(self.model, self.val_loader, criterion=self.criterion,
                       runtime=self.runtime, normalize=self.normalize, task=self.data.task,
                       info=self.info)
        if not math.isfinite(out.loss):
            raise NonFiniteError(f"the validation loss became {out.loss} at epoch {epoch + 1}: "
                                 "the run diverged and was stopped; lower --lr")
        self._account_val_failures(out)
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
            self._save_state()
            if self.info.is_main:
                write_atomically(cfg.output / "history.csv",
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
        out_dir, history = self.cfg.output, self.progress.history
        monitor = monitor_name(self.data.task)
        checkpoint.verify_weights(out_dir)
        self.model.load_state_dict(load_file(str(out_dir / checkpoint.WEIGHTS_FILE)))
        card = checkpoint.read_card(out_dir)
        with write_errors(out_dir):
            write_checkpoint(out_dir, self.model, name=card.name, arch=card.arch, task=card.task,
                             classes=card.classes, preprocessing=card.preprocessing,
                             stem=card.stem, thresholds=card.thresholds, metrics=card.metrics,
                             training=self.training_record(seconds),
                             reports={"curves.png": lambda p: report.plot_curves(
                                 p, history, monitor)})
        logger.info("best val_%s %.4f at epoch %d; checkpoint in %s (%.1fs)", monitor,
                    self.progress.best_value, self.progress.best_epoch + 1, out_dir, seconds)


def fit(cfg: TrainConfig, info: DistInfo | None = None,
        on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Train per `cfg`, export the best epoch into cfg.output, return its validation metrics."""
    info = info or DistInfo()
    try:
        return FitRun(cfg, info, on_epoch_end).run()
    finally:
        distributed.shutdown()
