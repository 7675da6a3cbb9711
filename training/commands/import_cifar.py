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
or failed import leaves no OUT behind; the staging folder of an import that was killed is
removed by the next import into the same OUT. Files are read a chunk of records at a time,
so memory stays flat whatever their size. Class names must be folder names that `fit` reads
back as they are (training.class_names): not hidden, not `__MACOSX`, not two spellings of
one name, at most 255 bytes.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.config import CifarImportConfig
from training.data.discovery import is_ignored_name, nfc
from training.exceptions import DataError, OutputError

logger = logging.getLogger(__name__)

SIDE = 32
PIXEL_BYTES = 3 * SIDE * SIDE
CHUNK_RECORDS = 1024  # records read at a time: about 3 MB, whatever the file's size
MAX_NAME_BYTES = 255  # the longest file name ext4, XFS, btrfs, APFS and NTFS take
STAGING_MARK = ".importing-"  # OUT is staged in .OUT.importing-XXXX beside it


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
    """The class names in `path`, one a line (blank lines skipped), `count` of them, in NFC:
    each must be a folder name that `fit` reads back as it is (training.data)."""
    if not path.is_file():
        raise DataError(f"{path}: class names file missing")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file of class names ({exc})") from exc
    names = [nfc(n) for n in names if n]  # fit compares names in NFC
    if len(names) != count:
        raise DataError(f"{path}: expected {count} class names, found {len(names)}")
    for name in names:
        problem = _name_problem(name)
        if problem:
            raise DataError(f"{path}: class name {_shown(name)} {problem}")
    repeated = next((n for n, times in Counter(names).items() if times > 1), None)
    if repeated is not None:
        raise DataError(f"{path}: class name {_shown(repeated)} is given twice (names are "
                        "compared in Unicode NFC, as fit compares them)")
    return names


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be a class folder that fit reads as this class (None when it can)."""
    if is_ignored_name(name):
        return "would be ignored by fit (a hidden name, or __MACOSX): rename it"
    if any(c in name for c in "/\\\0"):
        return "holds a path separator or a NUL byte"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes, the longest folder name most file " \
               "systems take"
    return None


def _shown(name: str, limit: int = 60) -> str:
    text = ascii(name)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def record_count(path: Path, layout: Layout) -> int:
    """How many records `path` holds, from its size (refused empty or not whole records)."""
    record = layout.label_bytes + PIXEL_BYTES
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file, no records")
    if size % record:
        raise DataError(f"{path}: truncated or not a {layout.name} file: record "
                        f"{size // record + 1} is incomplete ({size} bytes is not a "
                        f"multiple of the {record}-byte record)")
    return size // record


def read_records(path: Path, layout: Layout, label_at: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """[n] labels (of label byte `label_at`) and [n, 32, 32, 3] uint8 images of one file,
    CHUNK_RECORDS records at a time (memory stays flat whatever the file's size), every
    record checked: its length, and each of its label bytes against its class count."""
    record = layout.label_bytes + PIXEL_BYTES
    count = record_count(path, layout)
    with path.open("rb") as fh:
        for start in range(0, count, CHUNK_RECORDS):
            n = min(CHUNK_RECORDS, count - start)
            data = fh.read(n * record)
            if len(data) != n * record:
                raise DataError(f"{path}: changed while it was being read")
            rows = np.frombuffer(data, dtype=np.uint8).reshape(n, record)
            _check_labels(path, rows, layout, start)
            images = rows[:, layout.label_bytes:].reshape(-1, 3, SIDE, SIDE)
            yield rows[:, label_at], images.transpose(0, 2, 3, 1)


def _check_labels(path: Path, rows: np.ndarray, layout: Layout, start: int) -> None:
    for offset, classes in enumerate(layout.label_classes):
        wrong = np.flatnonzero(rows[:, offset] >= classes)
        if wrong.size:
            first = int(wrong[0])
            raise DataError(f"{path}: record {start + first + 1}: label byte "
                            f"{int(rows[first, offset])} is past the class count ({classes})")


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
        for _chunk in read_records(path, layout, label_at):
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(out)
    with staging_folder(out) as staging:
        total = sum(_write_file(staging, split, path, layout, label_at, names)
                    for split, path in files)
        staging.chmod(0o755)  # mkdtemp makes it private
        staging.rename(out)
    logger.info("imported %d %s images (%s labels, %d classes) into %s", total, layout.name,
                cfg.labels, len(names), out)
    return out


def _write_file(root: Path, split: str, path: Path, layout: Layout, label_at: int,
                names: list[str]) -> int:
    """Write one file's records as PNGs under root/split/<class>/; returns how many."""
    for name in names:
        (root / split / name).mkdir(parents=True, exist_ok=True)
    stem, index = path.stem, 0
    for labels, images in read_records(path, layout, label_at):
        for label, image in zip(labels.tolist(), images, strict=True):
            index += 1
            Image.fromarray(np.ascontiguousarray(image)).save(
                root / split / names[label] / f"{stem}_{index:05d}.png", format="PNG")
    logger.info("%s: %d images into %s/", path.name, index, split)
    return index


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A new hidden folder beside `out`, locked while this import writes it, removed unless
    it was renamed to `out` (a killed import's is removed by the next one)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}", dir=out.parent))
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends, however it ends
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def remove_abandoned_staging(out: Path) -> None:
    """Remove the staging folders of imports into `out` that ended without finishing (killed):
    those whose lock no process holds any more."""
    for staging in out.parent.glob(f".{glob.escape(out.name)}{STAGING_MARK}*"):
        try:
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another import is writing it now
            continue
        else:
            shutil.rmtree(staging, ignore_errors=True)
            logger.warning("removed %s, left by an import into %s that did not finish",
                           staging, out)
        finally:
            os.close(fd)
