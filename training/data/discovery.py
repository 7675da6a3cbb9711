"""Discovery: the samples of a class-folder tree or an `image,labels` CSV, and how names and
paths are read (class names compared in NFC; hidden and macOS leftover names passed over)."""

from __future__ import annotations

import csv
import io
import logging
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from models.decoding import DEFAULT_MAX_PIXELS
from models.image_formats import IMAGE_SUFFIXES
from training.data.images import skip_reason
from training.exceptions import (
    ClassMismatchError,
    CsvFormatError,
    DataError,
    EmptyClassError,
    MissingImageError,
)

logger = logging.getLogger(__name__)

TASK_NAMES = {"single": "single_label", "multi": "multi_label",
              "single_label": "single_label", "multi_label": "multi_label"}
IGNORED_FOLDERS = frozenset({"__MACOSX"})  # resource forks of zip files made on macOS


def nfc(name: str) -> str:
    """A class name in Unicode NFC (macOS writes folder names decomposed, as NFD)."""
    return unicodedata.normalize("NFC", name)


def is_ignored_name(name: str) -> bool:
    """True for a file or folder name that discovery passes over: hidden (`.DS_Store`,
    `._photo.jpg`) or a macOS zip leftover (`__MACOSX`)."""
    return name.startswith(".") or name in IGNORED_FOLDERS


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
