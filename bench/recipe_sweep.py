"""From-scratch recipe sweep on small real images: held-out accuracy and wall time per setting.

    python -m bench.recipe_sweep build /tmp/recipe-data            # digits, textures, shapes
    python -m bench.recipe_sweep run /tmp/recipe-data/digits --arch resnet18 --epochs 5 \\
        --label baseline -- --stem small                            # extra args go to `fit`
    python -m bench.recipe_sweep table /tmp/recipe-data/results.jsonl

Each dataset has `train/` (class folders; `fit` splits its own validation set off it) and a
disjoint `test/` that only `evaluate` sees. Datasets:

- digits: scikit-learn's 1797 real 8x8 handwritten digits, upscaled to 32 px (needs
  scikit-learn, a bench-only dependency); a seeded 75/25 split.
- textures: 40 px grey patches of eight scikit-image photographs and textures (brick, grass,
  gravel, camera, moon, coins, astronaut, coffee), cut at random places and scales with random
  brightness and contrast; training patches come from the left 65% of each picture, test
  patches from the right 35%, so test pixels were never seen in training.
- shapes: `python -m training synth` (a training set and a test set from another seed).

`run` times `python -m training fit ... --weights none --image-size 32 --no-progress`, then
`python -m training evaluate` on `test/`, and appends one JSON line to DATA/../results.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from models.checkpoint import HISTORY_FILE

TEXTURES = ["brick", "grass", "gravel", "camera", "moon", "coins", "astronaut", "coffee"]


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert("RGB").save(path)


def build_digits(out: Path, seed: int = 0) -> None:
    """Real handwritten digits (8x8, 17 grey levels) upscaled to 32 px, 75/25 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_test = len(order) // 4
    for rank, i in enumerate(order):
        split = "test" if rank < n_test else "train"
        img = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR))
        _save(big, out / split / str(digits.target[i]) / f"{i:04d}.png")


def jittered_patch(img: np.ndarray, rng: np.random.Generator, x: int, y: int, side: int,
                   size: int) -> np.ndarray:
    """The square at (x, y) of a grey picture, its contrast and brightness jittered, resized
    to `size` px (draws gain, then bias, from `rng`)."""
    patch = img[y:y + side, x:x + side].astype(np.float32)
    gain, bias = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
    patch = ((patch - patch.mean()) * gain + patch.mean() + bias).clip(0, 255)
    return np.asarray(Image.fromarray(patch.astype(np.uint8)).resize((size, size),
                                                                     Image.BILINEAR))


def _grey(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 3:
        img = (img[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return img


def build_textures(out: Path, *, train_per_class: int = 150, test_per_class: int = 50,
                   size: int = 40, seed: int = 0) -> None:
    """Grey patches at random scales; train and test from disjoint column ranges."""
    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        img = _grey(name)
        h, w = img.shape
        cut = int(w * 0.65)
        regions = {"train": (0, cut, train_per_class), "test": (cut, w, test_per_class)}
        for split, (x0, x1, count) in regions.items():
            for k in range(count):
                side = int(rng.integers(32, min(128, x1 - x0, h) + 1))
                x = int(rng.integers(x0, x1 - side + 1))
                y = int(rng.integers(0, h - side + 1))
                _save(jittered_patch(img, rng, x, y, side, size),
                      out / split / name / f"{k:04d}.png")


def build_shapes(out: Path) -> None:
    """The package's own generated shapes: train (seed 0) and test (seed 1)."""
    for split, seed, per_class in (("train", 0, 300), ("test", 1, 100)):
        subprocess.run([sys.executable, "-m", "training", "synth", str(out / split),
                        "--size", "32", "--per-class", str(per_class), "--classes", "4",
                        "--seed", str(seed)], check=True)


def best_images_per_second(out: Path) -> float:
    """The fastest training epoch of the run in `out` (its history.csv)."""
    with open(out / HISTORY_FILE) as fh:
        return max(float(e["images_per_second"]) for e in csv.DictReader(fh))


def fit_and_evaluate(train: Path, test: Path, out: Path, fit_args: list[str]
                     ) -> tuple[dict, dict, float]:
    """`training fit TRAIN --output OUT FIT_ARGS` then `training evaluate OUT TEST`: the card,
    the held-out metrics and the fit's wall seconds."""
    fit = [sys.executable, "-m", "training", "fit", str(train), "--output", str(out),
           "--no-progress", "--overwrite", *fit_args]
    start = time.perf_counter()
    subprocess.run(fit, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    ev = subprocess.run([sys.executable, "-m", "training", "evaluate", str(out), str(test)],
                        check=True, capture_output=True, text=True)
    card = json.loads((out / "card.json").read_text())
    return card, json.loads(ev.stdout), wall


def run(data: Path, arch: str, epochs: int, label: str, extra: list[str]) -> dict:
    """One fit + evaluate; returns (and appends) the result row."""
    out = Path("/tmp/recipe-runs") / f"{data.name}-{arch}-e{epochs}-{label}"
    card, metrics, wall = fit_and_evaluate(
        data / "train", data / "test", out,
        ["--arch", arch, "--weights", "none", "--image-size", "32", "--epochs", str(epochs),
         *extra])
    row = {"dataset": data.name, "arch": arch, "epochs": epochs, "label": label,
           "args": " ".join(extra), "recipe": card["training"]["recipe"],
           "val_accuracy": card["metrics"].get("accuracy"),
           "test_accuracy": round(metrics["accuracy"], 4),
           "train_seconds": card["training"]["seconds"], "wall_seconds": round(wall, 1),
           "best_images_per_second": best_images_per_second(out)}
    with open(data.parent / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
    return row


def table(results: Path) -> str:
    """The results as a Markdown table."""
    lines = ["| dataset | arch | epochs | setting | stem | bs | lr | min_scale | TA | "
             "held-out acc | wall s | img/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for raw in results.read_text().splitlines():
        r = json.loads(raw)
        rec = r["recipe"]
        if "best_images_per_second" not in r:  # rows written before the field existed
            name = f"{r['dataset']}-{r['arch']}-e{r['epochs']}-{r['label']}"
            r["best_images_per_second"] = best_images_per_second(Path("/tmp/recipe-runs") / name)
        lines.append(
            f"| {r['dataset']} | {r['arch']} | {r['epochs']} | {r['label']} | {rec['stem']} | "
            f"{rec['batch_size']} | {rec['lr']:g} | {rec['min_scale']:g} | "
            f"{rec['trivial_augment']:g} | {r['test_accuracy']:.3f} | {r['wall_seconds']:.0f} | "
            f"{r['best_images_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("root", type=Path)
    r = sub.add_parser("run")
    r.add_argument("data", type=Path)
    r.add_argument("--arch", default="resnet18")
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--label", default="default")
    t = sub.add_parser("table")
    t.add_argument("results", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "build":
        build_digits(args.root / "digits")
        build_textures(args.root / "textures")
        build_shapes(args.root / "shapes")
    elif args.command == "run":
        run(args.data, args.arch, args.epochs, args.label, extra)
    else:
        print(table(args.results))


if __name__ == "__main__":
    main()
