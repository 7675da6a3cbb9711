"""The image sets of the unknown-input bench (bench.unknown), all from real pictures that ship
in packages: scikit-learn's handwritten digits and scikit-image's photographs.

Known sets (train/ val/ test/, class folders; the multi-label one as CSVs):

- digits: the 1797 real 8x8 digits 0-9 at 32 px, a seeded 60/15/25 split.
- digits04: the digits 0-4 of the same split; digits59 (test only) are the 5-9: new classes of
  the same kind, the near case.
- textures: grey patches of eight scikit-image pictures (bench.recipe_sweep's set), 20% of
  its training patches moved to val/.
- mosaics: multi-label, 2x2 grids of digit scans with one to three cells filled; the labels
  are the digits shown.
- digits-small: the first 30 training and 20 validation images per class of digits (the
  same test images), for the runs at 224 px.
- textures-large: the eight pictures of `textures` cut at their own resolution, 112-320 px
  patches saved at 224 px (30 train, 20 val from the left 65% of each picture, 50 test from
  the rest), for the runs at 224 px: texture, not upscaled blur.

Outside sets (test/ only, never trained on):

- photos: colour crops, 48-256 px, of scikit-image photographs that none of the known sets
  uses (a cat, a rocket, the Hubble deep field, stained tissue, a retina).
- grey: grey crops of four other scikit-image pictures (cells, a clock, a printed page, text)
  and faces from its LFW subset: a set no score was chosen on, to check the choice.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from bench.recipe_sweep import TEXTURES, _grey, _save, build_textures, jittered_patch

PHOTOS = ["chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
GREY = ["cell", "clock", "page", "text"]  # grey pictures, kept apart to check the choice
SPLITS = (("test", 0.25), ("val", 0.15), ("train", 0.60))


def _digit(image: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 scan with 17 grey levels as uint8 at `size` px."""
    img = (image * (255 / 16)).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def _split_of(order: np.ndarray) -> dict[int, str]:
    """Sample index -> split name, by rank in a seeded order."""
    out, start = {}, 0
    for name, share in SPLITS:
        stop = len(order) if name == SPLITS[-1][0] else start + int(share * len(order))
        out.update({int(i): name for i in order[start:stop]})
        start = stop
    return out


def build_digit_sets(out: Path, seed: int = 0) -> None:
    """digits (0-9) and digits04 (train/val/test), digits59 (test), mosaics (CSV)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    split = _split_of(np.random.default_rng(seed).permutation(len(digits.target)))
    for i, label in enumerate(digits.target.tolist()):
        img = _digit(digits.images[i], 32)
        _save(img, out / "digits" / split[i] / str(label) / f"{i:04d}.png")
        known = "digits04" if label <= 4 else "digits59"
        if known == "digits04" or split[i] == "test":
            _save(img, out / known / split[i] / str(label) / f"{i:04d}.png")
    build_mosaics(out / "mosaics", digits.images, digits.target, split, seed=seed)


def build_mosaics(out: Path, images: np.ndarray, targets: np.ndarray, split: dict[int, str], *,
                  seed: int = 0, per_split: dict[str, int] | None = None) -> None:
    """2x2 grids of 16 px digit cells, each mosaic drawn from one split's scans only."""
    counts = per_split or {"train": 1200, "val": 300, "test": 400}
    rng = np.random.default_rng(seed + 1)
    for name, count in counts.items():
        pool = np.array([i for i, s in split.items() if s == name])
        rows = []
        for k in range(count):
            cells = rng.permutation(4)[:int(rng.integers(1, 4))]
            chosen = rng.choice(pool, size=len(cells), replace=False)
            canvas = np.zeros((32, 32), np.uint8)
            for cell, i in zip(cells, chosen, strict=True):
                y, x = 16 * (cell // 2), 16 * (cell % 2)
                canvas[y:y + 16, x:x + 16] = _digit(images[i], 16)
            path = out / name / f"{k:04d}.png"
            _save(canvas, path)
            labels = sorted({str(int(targets[i])) for i in chosen})
            rows.append([path.name, " ".join(labels)])
        with open(out / name / "labels.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["image", "labels"], *rows])


def build_texture_set(out: Path, seed: int = 0, val_share: float = 0.2) -> None:
    """bench.recipe_sweep's texture patches, a seeded share of the training ones as val/."""
    build_textures(out)
    rng = np.random.default_rng(seed)
    for folder in sorted((out / "train").iterdir()):
        files = sorted(folder.glob("*.png"))
        for path in rng.permutation(files)[:int(val_share * len(files))]:
            target = out / "val" / folder.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), target)


def build_photos(out: Path, per_photo: int = 72, seed: int = 0) -> None:
    """Colour crops of scikit-image photographs at random places and sizes (48-256 px)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        img = getattr(skimage.data, name)()[..., :3]
        h, w = img.shape[:2]
        for k in range(per_photo):
            side = int(rng.integers(48, min(256, h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            _save(img[y:y + side, x:x + side], out / "photos" / "test" / name / f"{k:03d}.png")


def build_grey(out: Path, per_picture: int = 60, seed: int = 0) -> None:
    """Grey crops (32-160 px) of GREY pictures and the first faces of the LFW subset."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in GREY:
        img = getattr(skimage.data, name)()
        h, w = img.shape[:2]
        for k in range(per_picture):
            side = int(rng.integers(32, min(160, h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            _save(img[y:y + side, x:x + side], out / "grey" / "test" / name / f"{k:03d}.png")
    for k, face in enumerate(skimage.data.lfw_subset()[:per_picture]):
        _save((face * 255).clip(0, 255).astype(np.uint8), out / "grey" / "test" / "faces" /
              f"{k:03d}.png")


def build_small(root: Path, name: str, per_class: dict[str, int] | None = None) -> None:
    """root/NAME-small: the first images of each class of root/NAME's train and val, and
    its test images."""
    counts = per_class or {"train": 30, "val": 20}
    for split, count in counts.items():
        for folder in sorted((root / name / split).iterdir()):
            for path in sorted(folder.glob("*.png"))[:count]:
                target = root / f"{name}-small" / split / folder.name / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    shutil.copytree(root / name / "test", root / f"{name}-small" / "test")


def build_large_textures(out: Path, *, counts: dict[str, int] | None = None, size: int = 224,
                         seed: int = 0) -> None:
    """Grey patches of 112-320 px (at most the region allows) at `size` px, with
    bench.recipe_sweep's brightness and contrast jitter; train/val left, test right."""
    counts = counts or {"train": 30, "val": 20, "test": 50}
    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        img = _grey(name)
        h, w = img.shape
        cut = int(w * 0.65)
        for split, count in counts.items():
            x0, x1 = (cut, w) if split == "test" else (0, cut)
            for k in range(count):
                side = int(rng.integers(min(112, x1 - x0, h), min(320, x1 - x0, h) + 1))
                x, y = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(0, h - side + 1))
                _save(jittered_patch(img, rng, x, y, side, size),
                      out / split / name / f"{k:04d}.png")


def build_all(root: Path) -> None:
    """Every set of the bench under `root`."""
    build_digit_sets(root)
    build_texture_set(root / "textures")
    build_photos(root)
    build_grey(root)
    build_small(root, "digits")
    build_large_textures(root / "textures-large")
