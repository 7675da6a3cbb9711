"""Multi-label training on real pictures: `fit`'s defaults against a plain loop, held out.

    python -m bench.multilabel build /tmp/multilabel                  # train/ and test/ sets
    python -m bench.multilabel plain /tmp/multilabel --epochs 6        # Adam + BCE, no augment
    python -m bench.multilabel run /tmp/multilabel --epochs 6 --label defaults
    python -m bench.multilabel run /tmp/multilabel --epochs 6 --label lr-1e-3 -- --lr 1e-3
    python -m bench.multilabel table /tmp/multilabel/results.jsonl

The set: 32 px black canvases, each holding one to three different real handwritten digits
from scikit-learn's `load_digits` (8x8 scans upscaled to 10-14 px), placed at random without
overlap; ten classes 0-9, in the `images/ + labels.csv` layout `fit` reads as multi-label.
The scans are split 75/25 first, so every digit in test/ is a scan train/ never shows.

`run` is `python -m training fit ROOT/train/labels.csv --arch resnet18 --weights none
--image-size 32 --epochs N --workers 1` plus the extra args, then `python -m training
evaluate` on ROOT/test/labels.csv (the card's tuned thresholds decide F1). `plain` trains the
same network (same stem, from scratch) on the same 80% of train/ that `fit` trains on, tunes
thresholds on the same 20%, and scores test/ with the same metric functions. Both append a
JSON line to ROOT/results.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.recipe_sweep import best_images_per_second, fit_and_evaluate
from models.architectures import build
from models.card import Preprocessing
from models.preprocessing import Normalize
from training.config import TrainConfig
from training.data.discovery import Sample, discover
from training.data.split import stratified_split
from training.loop.metrics import multi_label_metrics, tune_thresholds
from training.recipe import default_stem

logger = logging.getLogger(__name__)

CANVAS = 32
DIGIT_SIDES = (10, 14)  # upscaled side of one 8x8 scan, in pixels
TRAIN_IMAGES, TEST_IMAGES = 2000, 600
RUNS = Path("/tmp/multilabel-runs")


def _place(rng: np.random.Generator, sides: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of `sides` inside the canvas, none overlapping."""
    corners: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(100):
            x, y = (int(v) for v in rng.integers(0, CANVAS - side + 1, 2))
            if all(x + side <= cx or cx + cs <= x or y + side <= cy or cy + cs <= y
                   for cx, cy, cs in corners):
                corners.append((x, y, side))
                break
        else:
            return None
    return [(x, y) for x, y, _ in corners]


def _canvas(scans: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A black canvas with each 8x8 scan (0..16) upscaled and pasted without overlap."""
    while True:
        sides = [int(rng.integers(DIGIT_SIDES[0], DIGIT_SIDES[1] + 1)) for _ in scans]
        corners = _place(rng, sides)
        if corners is not None:
            break
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    for scan, side, (x, y) in zip(scans, sides, corners, strict=True):
        grey = Image.fromarray((scan * (255 / 16)).clip(0, 255).astype(np.uint8))
        canvas[y:y + side, x:x + side] = np.asarray(grey.resize((side, side), Image.BILINEAR))
    return canvas


def _write_split(out: Path, scans: np.ndarray, labels: np.ndarray, count: int,
                 rng: np.random.Generator) -> None:
    """`count` canvases from these scans, as out/images/*.png and out/labels.csv."""
    by_class = {c: np.flatnonzero(labels == c) for c in range(10)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        classes = sorted(rng.choice(10, size=int(rng.integers(1, 4)), replace=False).tolist())
        chosen = [scans[rng.choice(by_class[c])] for c in classes]
        name = f"images/{i:05d}.png"
        Image.fromarray(_canvas(chosen, rng)).convert("RGB").save(out / name)
        rows.append((name, " ".join(str(c) for c in classes)))
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "labels"])
        writer.writerows(rows)


def build_set(root: Path, seed: int = 0) -> None:
    """root/train and root/test, their digits from disjoint scans (a seeded 75/25 split)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    test_scans, train_scans = order[:len(order) // 4], order[len(order) // 4:]
    for split, picked, count in (("train", train_scans, TRAIN_IMAGES),
                                 ("test", test_scans, TEST_IMAGES)):
        _write_split(root / split, digits.images[picked], digits.target[picked], count, rng)
    logger.info("wrote %d train and %d test images under %s", TRAIN_IMAGES, TEST_IMAGES, root)


def _tensors(samples: list[Sample], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and multi-hot targets."""
    images = torch.stack([torch.from_numpy(np.array(Image.open(s.path).convert("RGB")))
                          .permute(2, 0, 1) for s in samples])
    targets = torch.zeros(len(samples), len(classes))
    for i, s in enumerate(samples):
        targets[i, [classes.index(c) for c in s.labels]] = 1.0
    return images, targets


@torch.inference_mode()
def _scores(model: nn.Module, normalize: nn.Module, images: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([torch.sigmoid(model(normalize(images[i:i + 128])))
                      for i in range(0, len(images), 128)]).numpy()


def plain(root: Path, *, arch: str, epochs: int, batch_size: int, seed: int) -> dict:
    """Adam 1e-3, plain BCE, no augmentation; test mAP/F1 with thresholds tuned on val."""
    torch.manual_seed(seed)
    found = discover(root / "train" / "labels.csv")
    train, val = stratified_split(found.samples, fraction=0.2, seed=seed)  # fit's own split
    (x, y), (xv, yv) = _tensors(train, found.classes), _tensors(val, found.classes)
    xt, yt = _tensors(discover(root / "test" / "labels.csv", classes=found.classes).samples,
                      found.classes)
    cfg = TrainConfig(data=root, output=RUNS, arch=arch, weights="none", image_size=CANVAS)
    stem = default_stem(cfg)
    model = build(arch, num_classes=len(found.classes), weights="none", stem=stem)
    normalize = Normalize(Preprocessing.for_crop(CANVAS, ratio=1.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            loss = loss_fn(model(normalize(x[idx])), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_map = multi_label_metrics(_scores(model, normalize, xv), yv.numpy(), found.classes,
                                      [0.5] * len(found.classes))["mAP"]
        logger.info("plain epoch %d/%d  val_mAP %.4f", epoch + 1, epochs, val_map)
    seconds = time.perf_counter() - start
    thresholds = tune_thresholds(_scores(model, normalize, xv), yv.numpy())
    test = multi_label_metrics(_scores(model, normalize, xt), yt.numpy(), found.classes,
                               thresholds)
    row = {"label": "plain", "args": f"Adam 1e-3, BCE, no augmentation, stem {stem}",
           "epochs": epochs, "batch_size": batch_size, "val_mAP": round(val_map, 4),
           **_held_out(test), "train_seconds": round(seconds, 1)}
    return _append(root, row)


def _held_out(metrics: dict) -> dict:
    return {"test_mAP": round(metrics["mAP"], 4), "test_f1_micro": round(metrics["f1_micro"], 4),
            "test_f1_macro": round(metrics["f1_macro"], 4)}


def _append(root: Path, row: dict) -> dict:
    with open(root / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
    return row


def run(root: Path, *, arch: str, epochs: int, label: str, extra: list[str]) -> dict:
    """One `fit` with the extra args, then `evaluate` on test/; the result row."""
    out = RUNS / f"{arch}-e{epochs}-{label}"
    card, metrics, wall = fit_and_evaluate(
        root / "train" / "labels.csv", root / "test" / "labels.csv", out,
        ["--arch", arch, "--weights", "none", "--image-size", str(CANVAS), "--epochs",
         str(epochs), "--workers", "1", *extra])
    with open(out / "history.csv") as fh:
        curve = [round(float(e["val_mAP"]), 3) for e in csv.DictReader(fh)]
    row = {"label": label, "args": " ".join(extra), "epochs": epochs,
           "recipe": card["training"]["recipe"], "val_mAP": round(card["metrics"]["mAP"], 4),
           "val_mAP_curve": curve, **_held_out(metrics),
           "train_seconds": card["training"]["seconds"], "wall_seconds": round(wall, 1),
           "best_images_per_second": best_images_per_second(out)}
    return _append(root, row)


def table(results: Path) -> str:
    """The results as a Markdown table."""
    lines = ["| setting | lr | warm-up | pos_weight | min_scale | hflip | val mAP by epoch | "
             "test mAP | test micro-F1 | test macro-F1 |", "|---" * 10 + "|"]
    for raw in results.read_text().splitlines():
        r = json.loads(raw)
        rec = r.get("recipe")
        knobs = ([f"{rec['lr']:g}", f"{rec['warmup_epochs']:g}", str(rec.get("pos_weight")),
                  f"{rec['min_scale']:g}", str(rec.get("hflip", True)).lower()] if rec
                 else ["1e-3 (Adam)", "0", "none", "no crop", "false"])
        setting = r["label"]
        curve = " ".join(f"{v:.2f}" for v in r.get("val_mAP_curve", [])) or f"{r['val_mAP']:.2f}"
        lines.append(f"| {setting} | {' | '.join(knobs)} | {curve} | {r['test_mAP']:.3f} | "
                     f"{r['test_f1_micro']:.3f} | {r['test_f1_macro']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("root", type=Path)
    for name in ("plain", "run"):
        p = sub.add_parser(name)
        p.add_argument("root", type=Path)
        p.add_argument("--arch", default="resnet18")
        p.add_argument("--epochs", type=int, default=6)
        if name == "plain":
            p.add_argument("--batch-size", type=int, default=32)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--label", default="defaults")
    sub.add_parser("table").add_argument("results", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "build":
        build_set(args.root)
    elif args.command == "plain":
        plain(args.root, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
              seed=args.seed)
    elif args.command == "run":
        run(args.root, arch=args.arch, epochs=args.epochs, label=args.label, extra=extra)
    else:
        print(table(args.results))


if __name__ == "__main__":
    main()
