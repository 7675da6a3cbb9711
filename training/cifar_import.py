"""`import-cifar`: the binary CIFAR-10 / CIFAR-100 distributions as class-folder PNG trees.

Only the binary version is read (fixed-size records, no unpickling):

- CIFAR-10 (`cifar-10-batches-bin`): data_batch_1..5.bin and test_batch.bin, records of one
  label byte then 3072 pixel bytes; class names in batches.meta.txt, one per line.
- CIFAR-100 (`cifar-100-binary`): train.bin and test.bin, records of a coarse label byte, a
  fine label byte, then 3072 pixel bytes; names in coarse_label_names.txt and
  fine_label_names.txt.

The pixels are 1024 red, then 1024 green, then 1024 blue bytes, each plane a row-major 32x32
image. The output is OUT/train/<class>/*.png and OUT/test/<class>/*.png, each image named
after its file and its record number (from 1). Every file is checked before anything is
written, and the tree is written in a staging folder renamed to OUT at the end, so a refused
or failed import leaves no OUT behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.config import CifarImportConfig
from training.exceptions import DataError, OutputError

logger = logging.getLogger(__name__)

SIDE = 32
PIXEL_BYTES = 3 * SIDE * SIDE


@dataclass(frozen=True)
class Layout:
    """One distribution: its folder name, files per split, label bytes and name files."""

    name: str
    folder: str
    splits: dict[str, tuple[str, ...]]
    label_classes: tuple[int, ...]  # the class count of each label byte of a record
    names: dict[str, tuple[str, int]]  # --labels -> (names file, which label byte)

    @property
    def label_bytes(self) -> int:
        return len(self.label_classes)

    def present_in(self, folder: Path) -> bool:
        return all((folder / f).is_file() for files in self.splits.values() for f in files)


CIFAR10 = Layout("CIFAR-10", "cifar-10-batches-bin",
                 {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                  "test": ("test_batch.bin",)},
                 label_classes=(10,), names={"fine": ("batches.meta.txt", 0)})
CIFAR100 = Layout("CIFAR-100", "cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)},
                  label_classes=(20, 100), names={"coarse": ("coarse_label_names.txt", 0),
                                                  "fine": ("fine_label_names.txt", 1)})
LAYOUTS = (CIFAR10, CIFAR100)


def find_layout(src: Path) -> tuple[Layout, Path]:
    """The distribution in `src` (or in its official subfolder) and the folder holding it."""
    for layout in LAYOUTS:
        for folder in (src, src / layout.folder):
            if layout.present_in(folder):
                return layout, folder
    pickled = [name for name in ("data_batch_1", "train") if (src / name).is_file()]
    hint = (" (this looks like the pickled Python version, which is not read: use the binary "
            "version)" if pickled else "")
    raise DataError(
        f"{src}: not a binary CIFAR distribution{hint}; expected "
        f"{', '.join(CIFAR10.splits['train'] + CIFAR10.splits['test'])} (CIFAR-10) or "
        f"train.bin, test.bin (CIFAR-100)")


def read_names(path: Path, count: int) -> list[str]:
    """The class names in `path`, one a line (blank lines skipped), `count` of them."""
    if not path.is_file():
        raise DataError(f"{path}: class names file missing")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file of class names ({exc})") from exc
    names = [n for n in names if n]
    bad = [n for n in names if n in (".", "..") or "/" in n or "\\" in n or "\0" in n]
    if len(names) != count or len(set(names)) != count or bad:
        raise DataError(f"{path}: expected {count} distinct class names usable as folder "
                        f"names, found {len(names)}{f' (unusable: {bad[:3]})' if bad else ''}")
    return names


def read_records(path: Path, layout: Layout, label_at: int) -> tuple[np.ndarray, np.ndarray]:
    """[N] labels (of label byte `label_at`) and [N, 32, 32, 3] uint8 images of one file,
    every record checked: its length, and each of its label bytes against its class count."""
    record = layout.label_bytes + PIXEL_BYTES
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"{path}: empty file, no records")
    if data.size % record:
        raise DataError(f"{path}: truncated or not a {layout.name} file: record "
                        f"{data.size // record + 1} is incomplete ({data.size} bytes is not a "
                        f"multiple of the {record}-byte record)")
    rows = data.reshape(-1, record)
    for offset, classes in enumerate(layout.label_classes):
        wrong = np.flatnonzero(rows[:, offset] >= classes)
        if wrong.size:
            first = int(wrong[0])
            raise DataError(f"{path}: record {first + 1}: label byte {int(rows[first, offset])} "
                            f"is past the class count ({classes})")
    images = rows[:, layout.label_bytes:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return rows[:, label_at].copy(), np.ascontiguousarray(images)


def import_cifar(cfg: CifarImportConfig) -> Path:
    """Convert cfg.src into cfg.out (see the module docstring); returns cfg.out."""
    layout, folder = find_layout(cfg.src)
    if cfg.labels not in layout.names:
        raise DataError(f"--labels {cfg.labels} applies to CIFAR-100 only; {folder} is "
                        f"{layout.name}")
    names_file, label_at = layout.names[cfg.labels]
    names = read_names(folder / names_file, layout.label_classes[label_at])
    out = cfg.out
    if out.exists():
        raise OutputError(f"{out} already exists: give a new folder to import into")
    files = [(split, folder / f) for split, fs in layout.splits.items() for f in fs]
    for _, path in files:  # check every file before writing anything
        read_records(path, layout, label_at)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        total = sum(_write_file(staging, split, path, layout, label_at, names)
                    for split, path in files)
        staging.chmod(0o755)  # mkdtemp makes it private
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("imported %d %s images (%s labels, %d classes) into %s", total, layout.name,
                cfg.labels, len(names), out)
    return out


def _write_file(root: Path, split: str, path: Path, layout: Layout, label_at: int,
                names: list[str]) -> int:
    """Write one file's records as PNGs under root/split/<class>/; returns how many."""
    labels, images = read_records(path, layout, label_at)
    for name in names:
        (root / split / name).mkdir(parents=True, exist_ok=True)
    stem = path.stem
    for index, (label, image) in enumerate(zip(labels.tolist(), images, strict=True), start=1):
        Image.fromarray(image).save(
            root / split / names[label] / f"{stem}_{index:05d}.png", format="PNG")
    logger.info("%s: %d images into %s/", path.name, len(labels), split)
    return len(labels)
