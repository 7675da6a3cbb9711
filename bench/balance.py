"""`--balance none|loss|sampler` on a real set made 10:1 imbalanced, judged on a balanced one.

    python -m bench.balance /tmp/balance --epochs 8 --seeds 0,1

scikit-learn's real handwritten digits (bench.recipe_sweep's 32 px build): in the training
split, digits 5-9 keep a tenth of their images; the test split stays balanced. Each
`--balance` value trains resnet18 from scratch on the imbalanced split (its validation a
split of the same, so no test image picks an epoch) and `training evaluate` scores the
balanced test split: balanced accuracy and the worst class's recall.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean

from bench.common import emit
from bench.recipe_sweep import build_digits

logger = logging.getLogger(__name__)

RARE_CLASSES = ("5", "6", "7", "8", "9")
KEEP_EVERY = 10  # a rare class keeps one image in ten


def build(root: Path) -> tuple[Path, Path]:
    """The imbalanced training folder and the balanced test folder under `root`."""
    digits = root / "digits"
    if not (digits / "test").is_dir():
        build_digits(digits)
    imbalanced = root / "imbalanced"
    if not imbalanced.is_dir():
        for folder in sorted((digits / "train").iterdir()):
            files = sorted(folder.iterdir())
            kept = files[::KEEP_EVERY] if folder.name in RARE_CLASSES else files
            (imbalanced / folder.name).mkdir(parents=True)
            for path in kept:
                shutil.copy(path, imbalanced / folder.name / path.name)
    return imbalanced, digits / "test"


def run_one(train: Path, test: Path, out: Path, balance: str, seed: int, epochs: int) -> dict:
    """Train with `--balance balance`, then score the balanced test folder."""
    python = sys.executable
    subprocess.run([python, "-m", "training", "fit", str(train), "--output", str(out),
                    "--overwrite", "--weights", "none", "--arch", "resnet18", "--image-size",
                    "32", "--epochs", str(epochs), "--seed", str(seed), "--workers", "0",
                    "--no-progress", "--balance", balance], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scored = subprocess.run([python, "-m", "training", "evaluate", str(out), str(test)],
                            check=True, capture_output=True, text=True)
    metrics = json.loads(scored.stdout)
    recalls = {c: v["recall"] for c, v in metrics["per_class"].items()}
    return {"balance": balance, "seed": seed, "accuracy": metrics["accuracy"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "worst_recall": min(recalls.values()),
            "rare_recall": mean(recalls[c] for c in RARE_CLASSES)}


def main(argv: list[str] | None = None) -> dict:
    """Build the sets, run every `--balance` value for every seed, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--balances", default="none,loss,sampler")
    args = parser.parse_args(argv)
    train, test = build(args.root)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for balance in args.balances.split(","):
            result = run_one(train, test, args.root / f"ckpt-{balance}-{seed}", balance, seed,
                             args.epochs)
            logger.info("%s", result)
            runs.append(result)
    summary = {b: {key: round(mean(r[key] for r in runs if r["balance"] == b), 4)
                   for key in ("accuracy", "balanced_accuracy", "worst_recall", "rare_recall")}
               for b in args.balances.split(",")}
    report = {"bench": "balance", "epochs": args.epochs, "runs": runs, "mean": summary}
    emit(report)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
