"""Training throughput: `python -m training fit` against a bare loop on the same model.

    python -m bench.train --arch resnet18 --image-size 32 --epochs 2      # CPU, from scratch
    python -m bench.train --arch resnet50 --image-size 224 --weights none --epochs 2  # GPU, AMP

The bare loop trains the same model (same stem, batch size, optimizer, channels_last, AMP) on
batches already in memory: the model-only ceiling. The ratio shows whether the data pipeline
(decode, augmentation, DataLoader workers) starves the model.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, environment
from models.architectures import build
from models.checkpoint import HISTORY_FILE
from models.device import Accelerator

logger = logging.getLogger(__name__)


def bare_images_per_s(arch: str, stem: str, num_classes: int, batch_size: int, size: int,
                      accelerator: Accelerator, steps: int) -> float:
    """Images/s of forward+backward+AdamW on an in-memory batch."""
    model = accelerator.prepare_model(build(arch, num_classes=num_classes, stem=stem)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = accelerator.to_device(torch.randn(batch_size, 3, size, size))
    y = torch.randint(0, num_classes, (batch_size,)).to(accelerator.device)
    scaler = torch.amp.GradScaler(enabled=accelerator.amp_dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with accelerator.autocast():
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(3):
        step()
    accelerator.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    accelerator.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Generate data, time `fit`, time the bare loop, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    py = sys.executable
    subprocess.run([py, "-m", "training", "synth", str(work / "data"), "--classes", "4",
                    "--per-class", str(args.per_class), "--size",
                    str(max(32, args.image_size))], check=True)
    fit_cmd = [py, "-m", "training", "fit", str(work / "data"), "--output", str(work / "ck"),
               "--arch", args.arch, "--weights", args.weights, "--image-size",
               str(args.image_size), "--epochs", str(args.epochs), "--device", args.device,
               "--no-progress"]
    if args.workers is not None:
        fit_cmd += ["--workers", str(args.workers)]
    subprocess.run(fit_cmd, check=True)
    card = json.loads((work / "ck" / "card.json").read_text())
    with open(work / "ck" / HISTORY_FILE) as fh:
        rows = list(csv.DictReader(fh))
    steady = rows[1:] or rows  # the first epoch includes worker start-up and warm-up
    fit_rate = sum(float(r["images_per_second"]) for r in steady) / len(steady)
    recipe = card["training"]["recipe"]
    accelerator = Accelerator.create(args.device, "auto")
    train_size = card["training"]["dataset"]["train"]
    bare = bare_images_per_s(card["arch"], card.get("stem", "imagenet"), len(card["classes"]),
                             recipe["batch_size"], args.image_size, accelerator,
                             steps=max(5, train_size // recipe["batch_size"]))
    result = {"env": environment(), "arch": card["arch"], "stem": card.get("stem"),
              "image_size": args.image_size, "batch_size": recipe["batch_size"],
              "precision": accelerator.precision_name,
              "fit_images_per_s": round(fit_rate, 1), "bare_images_per_s": round(bare, 1),
              "ratio": round(fit_rate / bare, 3)}
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
