"""Which "unknown input" score works on real data: energy, max softmax, or feature distance.

    python -m bench.unknown build /tmp/unknown-data      # digits 0-4, digits 5-9, textures, photos
    python -m bench.unknown train /tmp/unknown-data      # `fit` a checkpoint on each known set
    python -m bench.unknown measure /tmp/unknown-data    # AUROC and rejected shares per score

Known sets (each with `train/` for `fit` and a held-out `test/`):

- digits04: scikit-learn's real handwritten digits 0-4 at 32 px.
- textures: grey patches of eight scikit-image pictures (bench.recipe_sweep's set).

Other data, never seen in training:

- digits59: the digits 5-9, same scans, same style: "near" inputs, the hard case.
- textures / digits04: each known set's test images are the other's unknown inputs.
- photos: 32-128 px crops of scikit-image's colour photographs (cat, rocket, coffee ...).

For every checkpoint and score the bench reports the AUROC of "unknown" against the known
test images, and the share of each other set rejected at the threshold that accepts 95% of
the known test images (the rule `fit` stores, set on held-out images of the known kind).
Scores, higher = more unusual: energy (-logsumexp of the logits), msp (-max softmax), and
cosine (1 - the largest cosine similarity of the pooled features to the class means of the
training images; what `fit` stores and the service computes, models.unknown).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.recipe_sweep import _save, build_textures
from models import checkpoint
from models.architectures import arch_spec
from models.preprocessing import Normalize, eval_transform
from models.unknown import acceptance_threshold, auroc, class_means, cosine_distance

PHOTOS = ["chelsea", "rocket", "coffee", "astronaut", "hubble_deep_field", "immunohistochemistry"]
KNOWN = ("digits04", "textures")


def build_digit_sets(out: Path, seed: int = 0) -> None:
    """digits04 (train/test) and digits59 (test only), from one seeded 75/25 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for rank, i in enumerate(order):
        label = int(digits.target[i])
        split = "test" if rank < len(order) // 4 else "train"
        img = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR))
        if label <= 4:
            _save(big, out / "digits04" / split / str(label) / f"{i:04d}.png")
        elif split == "test":
            _save(big, out / "digits59" / "test" / str(label) / f"{i:04d}.png")


def build_photos(out: Path, per_photo: int = 60, seed: int = 0) -> None:
    """Colour crops of scikit-image's photographs at random places and sizes."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        img = getattr(skimage.data, name)()[..., :3]
        h, w = img.shape[:2]
        for k in range(per_photo):
            side = int(rng.integers(32, min(128, h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(img[y:y + side, x:x + side]).resize((32, 32), Image.BILINEAR)
            _save(np.asarray(crop), out / "photos" / "test" / name / f"{k:03d}.png")


def train(root: Path, epochs: int) -> None:
    """`fit` a resnet18 from scratch on each known set (the defaults, 32 px)."""
    for name in KNOWN:
        subprocess.run([sys.executable, "-m", "training", "fit", str(root / name / "train"),
                        "--output", str(root / "runs" / name), "--arch", "resnet18",
                        "--weights", "none", "--image-size", "32", "--epochs", str(epochs),
                        "--no-progress", "--overwrite"], check=True)


@torch.inference_mode()
def outputs(run: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, pooled features and class indices (folder order) of every image under folder."""
    model, card = checkpoint.load(run)
    model.eval()
    pooled: list[torch.Tensor] = []
    head = arch_spec(card.arch).head(model)
    hook = head.register_forward_hook(lambda _m, args, _out: pooled.append(args[0].clone()))
    transform, normalize = eval_transform(card.preprocessing), Normalize(card.preprocessing)
    paths = sorted(folder.rglob("*.png"))
    logits = []
    for start in range(0, len(paths), 128):
        chunk = paths[start:start + 128]
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in chunk])
        logits.append(model(normalize(batch)))
    hook.remove()
    names = sorted({p.parent.name for p in paths})
    labels = np.array([names.index(p.parent.name) for p in paths])
    return torch.cat(logits).numpy(), torch.cat(pooled).numpy(), labels


def scores_of(logits: np.ndarray, features: np.ndarray, means: torch.Tensor
              ) -> dict[str, np.ndarray]:
    """Every candidate score of the same images."""
    tensor = torch.as_tensor(logits)
    return {"energy": -torch.logsumexp(tensor, dim=1).numpy(),
            "msp": -torch.softmax(tensor, dim=1).max(dim=1).values.numpy(),
            "cosine": cosine_distance(torch.as_tensor(features), means).numpy()}


def measure(root: Path, known_sets: list[str]) -> list[dict]:
    """One row per (checkpoint, score, other set)."""
    others = {"digits04": ["digits59", "textures", "photos"],
              "textures": ["digits04", "photos"]}
    rows = []
    for known in known_sets:
        run = root / "runs" / known
        _, train_features, train_labels = outputs(run, root / known / "train")
        means = class_means(torch.as_tensor(train_features), torch.as_tensor(train_labels),
                            int(train_labels.max()) + 1)
        test_logits, test_features, _ = outputs(run, root / known / "test")
        known_scores = scores_of(test_logits, test_features, means)
        for other in others[known]:
            o_logits, o_features, _ = outputs(run, root / other / "test")
            other_scores = scores_of(o_logits, o_features, means)
            for score, values in known_scores.items():
                cut = acceptance_threshold(values)
                rows.append({"known": known, "other": other, "score": score,
                             "auroc": round(auroc(values, other_scores[score]), 3),
                             "rejected_at_95": round(float(np.mean(other_scores[score] > cut)), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["build", "train", "measure"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--known", nargs="+", default=list(KNOWN), choices=KNOWN)
    args = parser.parse_args()
    if args.step == "build":
        build_digit_sets(args.root)
        build_textures(args.root / "textures")
        build_photos(args.root)
    elif args.step == "train":
        train(args.root, args.epochs)
    else:
        rows = measure(args.root, args.known)
        print("| known | other | score | AUROC | rejected at 95% acceptance |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['known']} | {r['other']} | {r['score']} | {r['auroc']:.3f} | "
                  f"{r['rejected_at_95']:.3f} |")
        (args.root / "unknown.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
