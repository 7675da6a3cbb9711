"""`predict`: a checkpoint over every image of the sources, one row per image in order.

Decoding runs in DataLoader worker processes (`decode`), the model on whole batches on the
device, and the rows are appended durably after each batch (`rows`); rerunning after a crash
or a kill continues after the last complete row. Under torchrun each rank takes one slice
(`shards`).

Scores, labels and the unknown verdict come from the same `Predictor` calls the server makes
(`outputs`, then `answer` with the same options as /predict), on crops decoded by the same
`EvalCrop`, so a row holds what /predict answers for that file.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models import checkpoint
from models.device import Accelerator
from models.predict import ImageResult, Predictor
from models.preprocessing import EvalCrop
from training import distributed
from training.commands.predict import shards
from training.commands.predict.decode import (
    Batch,
    Crop,
    CropDataset,
    crop_loader,
    is_worker_death,
)
from training.commands.predict.options import PredictConfig
from training.commands.predict.rows import Row, RowFile
from training.commands.predict.sources import list_images
from training.distributed import DistInfo
from training.exceptions import ConfigError, DataError

logger = logging.getLogger(__name__)

DIED_REASON = "the decoding process died on it (a crash in the decoder, or a kill)"


@dataclass(frozen=True)
class Summary:
    """What the output holds at the end, and what this run added."""

    rows: int
    errors: int
    new_rows: int
    seconds: float


def predict(cfg: PredictConfig, info: DistInfo | None = None) -> Summary:
    """Classify every image of cfg.sources into cfg.output (see the module doc)."""
    info = info or DistInfo()
    paths = list_images(cfg.sources)
    shown = [str(p) for p in paths]
    accelerator = Accelerator.create(_device(cfg, info), "auto" if cfg.amp else "fp32")
    if info.enabled or shards.is_interrupted(cfg.output):
        new, seconds = _sharded(cfg, info, accelerator, paths, shown)
        return _summary(cfg, new, seconds, main=info.is_main)
    out = RowFile.open(cfg.output, all_scores=cfg.all_scores)
    try:
        shards.check_prefix(out.kept.paths, shown, cfg.output)  # before the model loads
        filler = Filler(out, paths, shown, load_labeler(cfg, accelerator), cfg,
                        show=cfg.progress)
        started = time.perf_counter()
        new = filler.run()
    finally:
        out.close()
    return _summary(cfg, new, time.perf_counter() - started, main=True)


def load_labeler(cfg: PredictConfig, accelerator: Accelerator) -> Labeler:
    """The checkpoint's Predictor on `accelerator`, with the options of this run."""
    checkpoint.verify_weights(cfg.checkpoint)
    model, card = checkpoint.load(cfg.checkpoint)
    if cfg.reject_unknown and card.unknown is None:
        raise ConfigError(f"--reject-unknown: the checkpoint {card.name} has no unknown-input "
                          "rule (its card was written without one)")
    return Labeler(Predictor(model, card, accelerator), cfg)


def _sharded(cfg: PredictConfig, info: DistInfo, accelerator: Accelerator, paths: list[Path],
             shown: list[str]) -> tuple[int, float]:
    """This rank's slice into its part file; rank 0 merges the parts. The rows added by all
    ranks together, and the seconds it took."""
    distributed.init(info, accelerator.device)
    try:
        listing = hashlib.sha256("\n".join(shown).encode("utf-8", "surrogateescape")).hexdigest()
        plan = distributed.broadcast_object(info, shards.make_plan(
            cfg.output, shown, info.world_size, listing, all_scores=cfg.all_scores)
            if info.is_main else None)
        if plan.listing != listing:
            raise DataError(f"rank {info.rank} lists other images than rank 0 (did the "
                            "sources change while the ranks started?)")
        first, end = plan.bounds(info.rank)
        out = RowFile.open(shards.part_path(cfg.output, info.rank, info.world_size),
                           all_scores=cfg.all_scores)
        try:
            filler = Filler(out, paths[first:end], shown[first:end],
                            load_labeler(cfg, accelerator), cfg,
                            show=cfg.progress and info.is_main)
            started = time.perf_counter()
            new = filler.run()
        finally:
            out.close()
        total_new = sum(distributed.gather_objects(info, new))  # also waits for every rank
        if info.is_main:
            shards.merge(cfg.output, plan, all_scores=cfg.all_scores)
        distributed.barrier(info)
        return total_new, time.perf_counter() - started
    finally:
        distributed.shutdown()


def _device(cfg: PredictConfig, info: DistInfo) -> str:
    """--device, made this rank's own GPU under torchrun."""
    if info.enabled and cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return cfg.device


class Labeler:
    """A batch of crops -> its rows, through the Predictor as the server calls it."""

    def __init__(self, predictor: Predictor, cfg: PredictConfig) -> None:
        self.predictor = predictor
        self.crop: Crop = EvalCrop(predictor.card.preprocessing)  # the server's decode recipe
        self.options = {"top_k": cfg.top_k, "threshold": cfg.threshold,
                        "all_scores": cfg.all_scores, "reject_unknown": cfg.reject_unknown}

    def rows(self, batch: Batch, shown: list[str], offset: int) -> list[Row]:
        """The rows of `batch`, in index order (`shown[offset + i]`: the path of index i)."""
        rows: dict[int, Row] = {f.index: {"path": shown[offset + f.index], "error": f.reason}
                                for f in batch.failed}
        if batch.indices:
            outputs = self.predictor.outputs(batch.images)
            results = self.predictor.answer(outputs, **self.options)
            rows.update((i, result_row(shown[offset + i], result))
                        for i, result in zip(batch.indices, results, strict=True))
        return [rows[i] for i in sorted(rows)]


def result_row(path: str, result: ImageResult) -> Row:
    """One image's row: /predict's result fields, under `path` instead of `filename`."""
    return {"path": path, **result.fields()}


class Filler:
    """Appends the rows of `paths` after those `out` already holds, batch by batch."""

    def __init__(self, out: RowFile, paths: list[Path], shown: list[str], labeler: Labeler,
                 cfg: PredictConfig, *, show: bool) -> None:
        shards.check_prefix(out.kept.paths, shown, out.path)
        self.out, self.paths, self.shown = out, paths, shown
        self.labeler, self.cfg = labeler, cfg
        self.show = show

    def run(self) -> int:
        """Fill the file to the end; the rows added."""
        done = first = len(self.out.kept.paths)
        if done:
            logger.info("%s already holds %d of the %d rows; continuing after them",
                        self.out.path, done, len(self.paths))
        with tqdm(total=len(self.paths), initial=done, unit="img", file=sys.stderr,
                  disable=not self.show, dynamic_ncols=True, smoothing=0.05) as self.bar:
            while done < len(self.paths):
                done, died = self._span(done, len(self.paths), self.cfg.workers,
                                        self.cfg.batch_size)
                if died:
                    done = self._isolate(done)
        return done - first

    def _span(self, start: int, stop: int, workers: int, batch_size: int) -> tuple[int, bool]:
        """Rows for images [start, stop); where it got to, and whether a decoding process
        died (then the file is read again, as the death may have interrupted a write)."""
        dataset = CropDataset(self.paths[start:stop], self.labeler.crop,
                              max_pixels=self.cfg.max_pixels, seconds=self.cfg.decode_seconds)
        loader = crop_loader(dataset, batch_size=batch_size, workers=workers,
                             memory_mb=self.cfg.decode_memory_mb,
                             pin_memory=self.labeler.predictor.accelerator.is_cuda)
        done = start
        try:
            for batch in loader:
                rows = self.labeler.rows(batch, self.shown, start)
                self.out.append(rows)
                done += len(rows)
                self.bar.update(len(rows))
        except RuntimeError as exc:
            if not is_worker_death(exc):
                raise
            logger.warning("%s; finding the image it died on", exc)
            self._reopen()
            return len(self.out.kept.paths), True
        return done, False

    def _isolate(self, done: int) -> int:
        """After a decoding process died: each image that may have been in flight decoded
        alone in a fresh process, so the one that kills it is found and given an error row."""
        stop = min(len(self.paths), done + 2 * self.cfg.batch_size * max(1, self.cfg.workers))
        while done < stop:
            reached, died = self._span(done, done + 1, 1, 1)
            if died and reached == done:  # it died before this image's row was written
                logger.warning("%s: %s", self.shown[reached], DIED_REASON)
                self.out.append([{"path": self.shown[reached], "error": DIED_REASON}])
                reached += 1
                self.bar.update(1)
            done = reached
        return done

    def _reopen(self) -> None:
        path = self.out.path
        self.out.close()
        self.out = RowFile.open(path, all_scores=self.labeler.options["all_scores"])
        shards.check_prefix(self.out.kept.paths, self.shown, path)
        self.bar.n = len(self.out.kept.paths)
        self.bar.refresh()


def _summary(cfg: PredictConfig, new: int, seconds: float, *, main: bool) -> Summary:
    """Count the output's rows and errors, and say so (rank 0 only)."""
    if not main:
        return Summary(0, 0, new, seconds)
    output = cfg.output
    out = RowFile.open(output, all_scores=cfg.all_scores)
    out.close()
    rows, errors = len(out.kept.paths), out.kept.errors
    rate = f"; {new / seconds:.1f} images/s" if new and seconds > 0 else ""
    logger.info("%s: %d rows, %d added by this run in %.1f s%s", output, rows, new, seconds,
                rate)
    if errors:
        logger.warning("%d of the %d images could not be classified: their rows hold an "
                       "`error` instead", errors, rows)
    return Summary(rows, errors, new, seconds)
