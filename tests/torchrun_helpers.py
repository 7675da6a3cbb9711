"""Running `training fit` under torchrun with two CPU processes, for the distributed tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun_fit(data: Path, out: Path, *options: str,
                 batch_size: int = 8) -> subprocess.CompletedProcess[str]:
    """`fit DATA --output OUT` on two gloo processes (resnet18 from scratch, 32 px, one
    epoch, CPU), with `options` added; the completed process, stderr captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training", "fit", str(data), "--output", str(out), "--weights", "none",
           "--arch", "resnet18", "--image-size", "32", "--epochs", "1",
           "--batch-size", str(batch_size), "--workers", "0", "--device", "cpu",
           "--no-progress", *options]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
