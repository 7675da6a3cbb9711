"""What the GPU command's steps share: the plan, the output folder, real JPEGs, checkpoints."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import IMAGENET_PRE, web_jpegs
from bench.gpu.plan import Plan
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.checkpoint import save
from models.device import Accelerator
from models.predict import Predictor

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the repository: where `python -m app` runs
PYTHON = sys.executable


@dataclass
class Context:
    """The plan, where results and scratch files go, and what is built once and reused."""

    plan: Plan
    out_dir: Path
    work_dir: Path
    _jpegs: list[bytes] = field(default_factory=list)
    _checkpoints: dict[str, Path] = field(default_factory=dict)

    def preprocessing(self, arch: str) -> Preprocessing:
        """ImageNet's eval preprocessing on a GPU; a toy crop for the dry run."""
        if self.plan.dry_run:
            return Preprocessing(resize=self.plan.resize, crop=self.plan.crop)
        return IMAGENET_PRE.get(arch, Preprocessing())

    def card(self, arch: str) -> ModelCard:
        """A card for `arch` with the plan's classes and preprocessing."""
        return ModelCard(name=f"bench-{arch}", arch=arch, task="single_label",
                         classes=[f"class_{i}" for i in range(self.plan.classes)],
                         preprocessing=self.preprocessing(arch))

    def jpegs(self, count: int = 0) -> list[bytes]:
        """Real photos as web-size JPEGs (500x375 to 1024x768), at least `count` of them."""
        wanted = max(count, 8 if self.plan.dry_run else 28)
        if len(self._jpegs) < wanted:
            self._jpegs = web_jpegs(wanted)
        return self._jpegs

    def checkpoint(self, arch: str) -> Path:
        """A random-weight checkpoint of `arch` (made once per run) in a folder of its own."""
        if arch not in self._checkpoints:
            directory = self.work_dir / "checkpoints" / arch / f"bench-{arch}"
            torch.manual_seed(0)
            save(directory, build(arch, num_classes=self.plan.classes, weights=None),
                 self.card(arch))
            self._checkpoints[arch] = directory
        return self._checkpoints[arch]

    def predictor(self, arch: str, precision: str) -> Predictor:
        """The service's own Predictor for `arch` on the plan's device at `precision`."""
        torch.manual_seed(0)
        model = build(arch, num_classes=self.plan.classes, weights=None).eval()
        return Predictor(model, self.card(arch), Accelerator.create(self.plan.device, precision))


@dataclass(frozen=True)
class Finished:
    """A command run to its end: exit status and output."""

    returncode: int
    stdout: str
    stderr: str


def run_bounded(command: list[str], timeout_s: float, work_dir: Path) -> Finished | None:
    """Run `command` from the repository in a session of its own, temporary files under
    `work_dir`; past `timeout_s`, kill its whole process group (a fit's or a prediction's
    worker processes too, so none is left on the GPU) and answer None."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "TMPDIR": str(work_dir)})
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        logger.warning("%s: over its %.0f s, killed", " ".join(command[:4]), timeout_s)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    return Finished(process.returncode, stdout, stderr)
