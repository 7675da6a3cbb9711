"""Datasets: discover class folders or `image,labels` CSVs, split them, and build loaders."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from models.decoding import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError
from training.class_names import is_ignored_name, nfc
from training.exceptions import (
    ClassMismatchError,
    CsvFormatError,
    DataError,
    EmptyClassError,
    MissingImageError,
)
from training.images import (
    DEFAULT_DECODE_MEMORY_MB,
    DEFAULT_DECODE_SECONDS,
    limit_worker_memory,
    load_training_image,
    skip_reason,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TASK_NAMES = {"single": "single_label", "multi": "multi_label",
              "single_label": "single_label", "multi_label": "multi_label"}


@dataclass(frozen=True)
class Sample:
    """One image and its labels (class names; exactly one for single-label data)."""

    path: Path
    labels: tuple[str, ...]


@dataclass
class SampleSet:
    """The samples found at one location, their ordered classes, and the task they imply."""

    samples: list[Sample]
    classes: list[str]
    task: str
    root: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (image, why) at discovery


def infer_task(location: str | Path, task: str | None = None) -> str:
    """The task of the data at `location`: `task` where given, else multi-label for a CSV."""
    if task:
        return TASK_NAMES[task]
    return "multi_label" if Path(location).suffix.lower() == ".csv" else "single_label"


def discover(location: str | Path, *, task: str | None = None,
             classes: Sequence[str] | None = None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> SampleSet:
    """Read a class-folder tree or an `image,labels` CSV; `classes` pins the class order."""
    location = Path(location)
    skipped: list[tuple[Path, str]] = []
    if location.is_dir():
        found = _discover_folder(location, max_pixels, skipped)
    elif location.is_file() and location.suffix.lower() == ".csv":
        found = _discover_csv(location, max_pixels, skipped)
    else:
        raise DataError(f"{location}: not a class folder nor a .csv file")
    resolved = infer_task(location, task)
    if resolved == "single_label":
        bad = [s for s in found if len(s.labels) != 1]
        if bad:
            raise DataError(f"{location}: single-label needs exactly one label per image; "
                            f"{bad[0].path} has {len(bad[0].labels)}")
    names = sorted({label for s in found for label in s.labels})
    if classes is not None:
        found, names = _pin_classes(location, found, names, classes)
    if not names:
        raise DataError(f"{location}: no labels found")
    if resolved == "single_label" and classes is None and len(names) == 1:
        raise DataError(_one_class_message(location, names[0], len(found)))
    if skipped:
        logger.warning("%s: skipped %d of %d images (named above)", location, len(skipped),
                       len(skipped) + len(found))
    root = location if location.is_dir() else location.parent
    return SampleSet(found, names, resolved, root, skipped)


def _pin_classes(location: Path, found: list[Sample], names: list[str],
                 classes: Sequence[str]) -> tuple[list[Sample], list[str]]:
    """Map the found labels onto `classes` (compared in NFC), refusing unknown ones."""
    canonical = {nfc(c): c for c in classes}
    unknown = sorted(set(names) - set(canonical))
    if unknown:
        raise ClassMismatchError(f"{location}: classes {unknown[:5]} are not among the "
                                 f"model's {len(classes)} classes")
    found = [Sample(s.path, tuple(canonical[c] for c in s.labels)) for s in found]
    return found, list(classes)


def _one_class_message(location: Path, name: str, count: int) -> str:
    csvs = sorted(p for p in [*location.glob("*.csv"), *location.glob("*/*.csv")])
    hint = (f"; for multi-label data pass the CSV instead, e.g. `fit {csvs[0]}`" if csvs
            else "; for multi-label data pass a CSV with the header image,labels")
    return (f"{location}: found one class folder ({name!r}, {count} images), but single-label "
            f"training needs at least two (one subfolder per class){hint}")


def _usable(path: Path, max_pixels: int, skipped: list[tuple[Path, str]]) -> bool:
    reason = skip_reason(path, max_pixels)
    if reason is None:
        return True
    logger.warning("skipping image %s: %s", path, reason)
    skipped.append((path, reason))
    return False


def _is_visible(path: Path, root: Path) -> bool:
    return not any(is_ignored_name(p) for p in path.relative_to(root).parts)


def _shown_path(path: Path) -> str:
    """`path` for a message, bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _class_folders(root: Path) -> list[Path]:
    """The class subfolders of `root`, sorted. A name that is not UTF-8 is refused (it could
    not be written into the card, nor sent by the server). A linked folder is followed when
    it leads outside `root`; one that leads back into `root`, to a folder holding it, or into
    another class's folder is left out with a warning: its images would be counted again,
    under another class and on both sides of the split."""
    real_root = root.resolve()
    folders: list[Path] = []
    taken: list[Path] = [real_root]  # what the classes kept so far (and the root) cover
    for path in sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p, root)):
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{_shown_path(path)}: the class folder's name is not UTF-8 (bytes "
                f"{os.fsencode(path.name)!r}); rename it in UTF-8, e.g. with "
                "`convmv -f latin1 -t utf8`") from None
        if path.is_symlink():
            target = path.resolve()
            if any(target.is_relative_to(t) or t.is_relative_to(target) for t in taken):
                logger.warning("%s: left out: the link leads to %s, whose images are already "
                               "counted", _shown_path(path), _shown_path(target))
                continue
            taken.append(target)
        folders.append(path)
    return folders


def _discover_folder(root: Path, max_pixels: int, skipped: list[tuple[Path, str]]
                     ) -> list[Sample]:
    class_dirs = _class_folders(root)
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders (expected one folder per class)")
    samples: list[Sample] = []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and _is_visible(p, class_dir)
                       and p.is_file())
        if not files:
            raise EmptyClassError(f"{class_dir}: class folder {class_dir.name!r} holds no images")
        usable = [p for p in files if _usable(p, max_pixels, skipped)]
        if not usable:
            raise EmptyClassError(f"{class_dir}: no usable images in class {class_dir.name!r} "
                                  f"(all {len(files)} skipped, see the warnings above)")
        samples.extend(Sample(p, (nfc(class_dir.name),)) for p in usable)
    return samples


def unlabelled_samples(location: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS
                       ) -> list[Sample]:
    """Every usable image under `location` (a file or any folder tree), with no labels."""
    root = Path(location)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and _is_visible(p, root) and p.is_file())
    else:
        raise DataError(f"{root}: no such file or folder")
    skipped: list[tuple[Path, str]] = []
    samples = [Sample(p, ()) for p in files if _usable(p, max_pixels, skipped)]
    if not samples:
        raise DataError(f"{root}: no usable images found")
    return samples


def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """The data rows of an `image,labels` CSV (UTF-8, with or without a BOM) and their lines."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CsvFormatError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                             "save the file as UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["image", "labels"]:
            raise CsvFormatError(f"{path}: header must be 'image,labels', got {','.join(header)!r}")
        return [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise CsvFormatError(f"{path}:{reader.line_num}: {exc}") from exc


def _discover_csv(path: Path, max_pixels: int, skipped: list[tuple[Path, str]]
                  ) -> list[Sample]:
    """Rows name images relative to the CSV's folder (`../` allowed) or by absolute path."""
    by_image: dict[Path, tuple[Path, list[str]]] = {}
    repeats: list[tuple[int, str]] = []
    for line, row in _read_csv(path):
        if not row or not row[0].strip():
            continue
        image = path.parent / row[0].strip()  # an absolute path replaces the folder
        if not image.is_file():
            raise MissingImageError(f"{path}:{line}: image {row[0].strip()!r} does not exist "
                                    f"(looked for {image})")
        labels = [nfc(label) for label in (row[1] if len(row) > 1 else "").split()]
        key = image.resolve()
        if key in by_image:
            repeats.append((line, row[0].strip()))
            by_image[key][1].extend(labels)
        else:
            by_image[key] = (image, labels)
    if repeats:
        logger.warning("%s: %d rows repeat an image listed earlier (first: line %d, %s); each "
                       "image is used once, with the labels of all its rows", path,
                       len(repeats), *repeats[0])
    samples = [Sample(image, tuple(dict.fromkeys(labels))) for image, labels in by_image.values()
               if _usable(image, max_pixels, skipped)]
    if not samples:
        raise DataError(f"{path}: no usable images listed")
    return samples


def sample_key(path: Path, root: Path) -> str:
    """How a split names an image: its path relative to the data root, in POSIX form."""
    return Path(os.path.relpath(path, root)).as_posix()


def stratified_split(samples: Sequence[Sample], *, fraction: float, seed: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """Seeded split that keeps each class's share (multi-label: grouped by rarest label)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-fraction must lie in (0, 1), got {fraction}")
    counts: dict[str, int] = defaultdict(int)
    for s in samples:
        for label in s.labels:
            counts[label] += 1
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        key = min(s.labels, key=lambda c: (counts[c], c)) if s.labels else ""
        groups[key].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda s: str(s.path))
        rng.shuffle(members)
        n_val = round(len(members) * fraction) if len(members) > 1 else 0
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    if not val:
        raise DataError("the validation split is empty: add images or pass --val")
    # One canonical order, so a split read back from split.json batches identically.
    return sorted(train, key=lambda s: str(s.path)), sorted(val, key=lambda s: str(s.path))


def classes_without(samples: Sequence[Sample], classes: Sequence[str]) -> list[str]:
    """The classes that no sample carries."""
    present = {label for s in samples for label in s.labels}
    return [c for c in classes if c not in present]


def split_digest(train: Sequence[Sample], train_root: Path, val: Sequence[Sample],
                 val_root: Path) -> str:
    """A sha256 naming exactly which images train and which validate."""
    payload = {"train": sorted(sample_key(s.path, train_root) for s in train),
               "val": sorted(sample_key(s.path, val_root) for s in val)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def split_payload(root: Path, train: Sequence[Sample], val: Sequence[Sample], *, seed: int,
                  fraction: float) -> str:
    """The text of split.json: the split as paths relative to the data root."""
    payload = {"root": str(root), "seed": seed, "val_fraction": fraction,
               "train": sorted(sample_key(s.path, root) for s in train),
               "val": sorted(sample_key(s.path, root) for s in val)}
    return json.dumps(payload, indent=1) + "\n"


def read_split(path: Path, samples: Sequence[Sample], root: Path
               ) -> tuple[list[Sample], list[Sample]]:
    """Re-apply a split written by `split_payload` to freshly discovered samples."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        recorded = [*payload["train"], *payload["val"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a split file ({exc})") from exc
    by_key = {sample_key(s.path, root): s for s in samples}
    missing = [r for r in recorded if r not in by_key]
    if missing:
        raise DataError(f"{path}: {len(missing)} images of the recorded split are gone, "
                        f"e.g. {missing[0]}")

    def ordered(keys: list[str]) -> list[Sample]:
        return sorted((by_key[k] for k in keys), key=lambda s: str(s.path))
    return ordered(payload["train"]), ordered(payload["val"])


@dataclass(frozen=True)
class DecodeFailure:
    """What the dataset returns for a sample whose image cannot be decoded."""

    index: int


class Batch(NamedTuple):
    """A collated batch of the decodable samples, and the dataset indices that failed."""

    images: torch.Tensor  # uint8 NCHW (zero rows when every image of the batch failed)
    targets: torch.Tensor
    indices: torch.Tensor
    failed: torch.Tensor


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int] | DecodeFailure]) -> Batch:
    """Stack the decoded samples; a failed one is left out (never replaced), its index kept."""
    failed = torch.tensor([it.index for it in items if isinstance(it, DecodeFailure)],
                          dtype=torch.long)
    good = [it for it in items if not isinstance(it, DecodeFailure)]
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return Batch(torch.empty(0, dtype=torch.uint8), empty, empty, failed)
    images, targets, indices = default_collate(good)
    return Batch(images, targets, indices, failed)


class ImageDataset(Dataset):
    """Decodes images, applies a transform, and returns (uint8 image, target, index).

    An image that fails to decode mid-run gives a `DecodeFailure` (logged once), which
    `collate` leaves out of the batch: the sample is skipped together with its label.
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], task: str,
                 transform: Callable[[Image.Image], torch.Tensor], *,
                 decode_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 decode_seconds: float = DEFAULT_DECODE_SECONDS) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.task = task
        self.transform = transform
        self.decode_size = decode_size
        self.max_pixels = max_pixels
        self.decode_seconds = decode_seconds
        self.index = {c: i for i, c in enumerate(self.classes)}
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, i: int) -> torch.Tensor:
        """The label tensor of sample i (class index, or a multi-hot float vector)."""
        labels = self.samples[i].labels
        if self.task == "single_label":
            return torch.tensor(self.index[labels[0]], dtype=torch.long)
        out = torch.zeros(len(self.classes))
        out[[self.index[c] for c in labels]] = 1.0
        return out

    def targets(self) -> torch.Tensor:
        """All targets stacked (for class weights and metrics)."""
        return torch.stack([self.target(i) for i in range(len(self))]) if self.samples \
            else torch.empty(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int] | DecodeFailure:
        path = self.samples[i].path
        try:
            image = load_training_image(path, max_pixels=self.max_pixels,
                                        target_size=self.decode_size,
                                        seconds=self.decode_seconds)
            pixels = self.transform(image)
        except MemoryError:  # a worker's memory is capped (--decode-memory-mb)
            return self._failed(i, path, "decoding it needs more memory than a DataLoader "
                                "worker may use (--decode-memory-mb)")
        except (ImageDecodeError, ImageTooLargeError, OSError) as exc:
            return self._failed(i, path, str(exc))
        return pixels, self.target(i), i

    def _failed(self, i: int, path: Path, reason: str) -> DecodeFailure:
        if i not in self._warned:
            self._warned.add(i)
            logger.warning("skipping image %s and its label: %s", path, reason)
        return DecodeFailure(i)


def make_loader(dataset: ImageDataset, *, batch_size: int, workers: int, shuffle: bool,
                pin_memory: bool, sampler: Sampler | None = None, seed: int = 0,
                drop_last: bool = False,
                worker_memory_mb: int | None = DEFAULT_DECODE_MEMORY_MB) -> DataLoader:
    """A DataLoader of `Batch`es, with persistent workers when there are any, each worker's
    memory capped at `worker_memory_mb` over its footprint at start (None: no cap)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        drop_last=drop_last, generator=generator, collate_fn=collate,
        worker_init_fn=None if worker_memory_mb is None
        else functools.partial(limit_worker_memory, memory_mb=worker_memory_mb))
