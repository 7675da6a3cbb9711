"""The models of the unknown-input bench: which known set, image size, length and arch each
is `fit` with (from scratch, resnet18 unless named, the recipe defaults otherwise)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One `fit` of the bench."""

    known: str  # a known set of bench.unknown_data
    size: int  # --image-size
    strength: str  # "short" or "long": how many epochs
    epochs: int
    arch: str = "resnet18"
    batch_size: int | None = None  # None: the recipe's

    @property
    def name(self) -> str:
        arch = "" if self.arch == "resnet18" else f"-{self.arch}"
        return f"{self.known}-{self.size}px-{self.strength}{arch}"

    def done(self, root: Path) -> bool:
        """Whether the run's fit finished: its card holds the unknown-input rule (the cards
        written after each best epoch do not)."""
        card = root / "runs" / self.name / "card.json"
        return card.is_file() and json.loads(card.read_text()).get("unknown") is not None

    def data(self, root: Path, split: str) -> Path:
        """The run's train/val data as `fit` takes it (the multi-label set as a CSV)."""
        folder = root / self.known / split
        return folder / "labels.csv" if self.known == "mosaics" else folder


KNOWN = ("digits", "digits04", "textures", "mosaics")
# epochs per image size and strength, sized so that every fit together takes about an hour of
# one CPU core (the 224 px sets are small, the 64 px runs two of the known sets)
EPOCHS = {32: {"short": 3, "long": 12}, 64: {"short": 2, "long": 4},
          224: {"short": 2, "long": 4}}
RUNS = [Run(k, 32, strength, epochs) for k in KNOWN
        for strength, epochs in EPOCHS[32].items()]
# the model of the report this bench answers: resnet34, 32 px, 6 epochs
RUNS.append(Run("digits", 32, "report", 6, arch="resnet34"))
# batches of 8 at 224 px: the few images there give four times the steps (at the recipe's
# 32 the digits model was still at chance after two epochs)
RUNS += [Run(k, 224, strength, epochs, batch_size=8) for k in ("digits-small", "textures-large")
         for strength, epochs in EPOCHS[224].items()]
RUNS += [Run(k, 64, strength, epochs) for k in ("digits", "textures")
         for strength, epochs in EPOCHS[64].items()]


def train(root: Path, runs: list[Run], *, threads: int = 1) -> None:
    """`fit` each run into root/runs/NAME (skipped when its card exists), on `threads` CPU
    threads and no loader workers, so that the bench shares a busy machine politely."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for run in runs:
        out = root / "runs" / run.name
        if run.done(root):
            continue
        logger.info("fit %s", run.name)
        start = time.monotonic()
        batch = [] if run.batch_size is None else ["--batch-size", str(run.batch_size)]
        subprocess.run([sys.executable, "-m", "training", "fit", str(run.data(root, "train")),
                        "--val", str(run.data(root, "val")), "--output", str(out),
                        "--arch", run.arch, "--weights", "none",
                        "--image-size", str(run.size), "--epochs", str(run.epochs), *batch,
                        "--workers", "0", "--no-progress", "--overwrite"], check=True, env=env)
        logger.info("fit %s took %.0f s", run.name, time.monotonic() - start)
