"""Datasets: discover class folders or `image,labels` CSVs, split them, and build loaders."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from models.preprocessing import ImageDecodeError, ImageTooLargeError, load_image_file
from training.errors import (
    ClassMismatchError,
    CsvFormatError,
    DataError,
    EmptyClassError,
    MissingImageError,
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


def discover(location: str | Path, *, task: str | None = None,
             classes: Sequence[str] | None = None) -> SampleSet:
    """Read a class-folder tree or an `image,labels` CSV; `classes` pins the class order."""
    location = Path(location)
    if location.is_dir():
        found = _discover_folder(location)
        inferred = "single_label"
    elif location.is_file() and location.suffix.lower() == ".csv":
        found = _discover_csv(location)
        inferred = "multi_label"
    else:
        raise DataError(f"{location}: not a class folder nor a .csv file")
    resolved = TASK_NAMES[task] if task else inferred
    if resolved == "single_label":
        bad = [s for s in found if len(s.labels) != 1]
        if bad:
            raise DataError(f"{location}: single-label needs exactly one label per image; "
                            f"{bad[0].path} has {len(bad[0].labels)}")
    names = sorted({label for s in found for label in s.labels})
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ClassMismatchError(f"{location}: classes {unknown[:5]} are not among the "
                                     f"model's {len(classes)} classes")
        names = list(classes)
    if not names:
        raise DataError(f"{location}: no labels found")
    root = location if location.is_dir() else location.parent
    return SampleSet(found, names, resolved, root)


def _readable_header(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - opening parses the header, which is the check
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        logger.warning("skipping unreadable image %s (%s)", path, exc)
        return False


def _discover_folder(root: Path) -> list[Sample]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders (expected one folder per class)")
    samples: list[Sample] = []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EmptyClassError(f"{class_dir}: class folder {class_dir.name!r} holds no images")
        readable = [p for p in files if _readable_header(p)]
        if not readable:
            raise EmptyClassError(f"{class_dir}: no readable images in class {class_dir.name!r}")
        samples.extend(Sample(p, (class_dir.name,)) for p in readable)
    return samples


def _discover_csv(path: Path) -> list[Sample]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["image", "labels"]:
            raise CsvFormatError(f"{path}: header must be 'image,labels', got {','.join(header)!r}")
        rows = list(reader)
    samples = []
    for line, row in enumerate(rows, start=2):
        if not row or not row[0].strip():
            continue
        image = path.parent / row[0].strip()
        if not image.is_file():
            raise MissingImageError(f"{path}:{line}: image {row[0].strip()!r} does not exist "
                                    f"(looked for {image})")
        labels = tuple(dict.fromkeys((row[1] if len(row) > 1 else "").split()))
        if _readable_header(image):
            samples.append(Sample(image, labels))
    if not samples:
        raise DataError(f"{path}: no readable images listed")
    return samples


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


def write_split(path: Path, root: Path, train: Sequence[Sample], val: Sequence[Sample],
                *, seed: int, fraction: float) -> None:
    """Record a split as relative paths so it can be reproduced or resumed."""
    def rel(s: Sample) -> str:
        return s.path.relative_to(root).as_posix()
    payload = {"root": str(root), "seed": seed, "val_fraction": fraction,
               "train": sorted(rel(s) for s in train), "val": sorted(rel(s) for s in val)}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def read_split(path: Path, samples: Sequence[Sample], root: Path
               ) -> tuple[list[Sample], list[Sample]]:
    """Re-apply a split written by `write_split` to freshly discovered samples."""
    payload = json.loads(path.read_text())
    by_rel = {s.path.relative_to(root).as_posix(): s for s in samples}
    missing = [r for r in payload["train"] + payload["val"] if r not in by_rel]
    if missing:
        raise DataError(f"{path}: {len(missing)} images of the recorded split are gone, "
                        f"e.g. {missing[0]}")
    def ordered(rels: list[str]) -> list[Sample]:
        return sorted((by_rel[r] for r in rels), key=lambda s: str(s.path))
    return ordered(payload["train"]), ordered(payload["val"])


class ImageDataset(Dataset):
    """Decodes images, applies a transform, and returns (uint8 image, target, index).

    An image that fails to decode mid-run is replaced by the next one with a warning, so one bad
    file cannot end a long run.
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], task: str,
                 transform: Callable[[Image.Image], torch.Tensor], *,
                 decode_size: int | None = None) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.task = task
        self.transform = transform
        self.decode_size = decode_size
        self.index = {c: i for i, c in enumerate(self.classes)}

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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        for attempt in range(len(self.samples)):
            j = (i + attempt) % len(self.samples)
            try:
                image = load_image_file(str(self.samples[j].path), target_size=self.decode_size)
            except (ImageDecodeError, ImageTooLargeError, OSError) as exc:
                logger.warning("skipping unreadable image %s (%s)", self.samples[j].path, exc)
                continue
            return self.transform(image), self.target(j), j
        raise DataError("no image in the dataset can be decoded")


def make_loader(dataset: ImageDataset, *, batch_size: int, workers: int, shuffle: bool,
                pin_memory: bool, sampler: Sampler | None = None, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with persistent workers when there are any."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        drop_last=drop_last, generator=generator)
