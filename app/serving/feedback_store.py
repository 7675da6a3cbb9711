"""Labelled images sent back by users, written into a dataset folder `fit` reads.

Under the feedback folder each model has its own:

    <feedback_dir>/<model>/data/<class>/<sha256>.<ext>      single-label: class folders
    <feedback_dir>/<model>/data/images/<sha256>.<ext>       multi-label: the images, and
    <feedback_dir>/<model>/data/labels.csv                  their `image,labels` rows
    <feedback_dir>/<model>/review/<sha256>.<ext>            images kept for review (app.review)
    <feedback_dir>/<model>/review/predictions.jsonl         what the model said of each

so `python -m training fit <feedback_dir>/<model>/data ...` trains on it as it is. A file is
named by its content's sha256: the same image sent twice is one file, and sent again with
other labels it is relabelled (moved to its new class folder, or its CSV row rewritten).

Every change is atomic: an image is written to a temporary file beside the dataset, synced,
then renamed into place; a CSV row is appended in one write and synced, and a failed append
is cut back off; a rewritten CSV replaces the old one by rename. Each model's folder has a
quota; a write that would pass it, or that the disk refuses (full, over a file size limit),
raises `StorageFullError` with nothing of it left behind. Writers in several server processes
take the model's lock file (`flock`) in turn.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from app.exceptions import InvalidRequestError, StorageFullError
from models.image_formats import IMAGE_FORMATS, OPENERS

logger = logging.getLogger(__name__)

DATA, REVIEW, TEMPORARY, LOCK = "data", "review", ".tmp", ".lock"
IMAGES, LABELS_CSV = "images", "labels.csv"
CSV_HEADER = "image,labels\n"
MAX_LABEL_CHARS = 128
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
IGNORED_NAMES = frozenset({"__MACOSX"})  # class folders `fit` passes over


@dataclass(frozen=True)
class Stored:
    """What a feedback write did: `created`, `relabelled` or `unchanged`, and the image's
    path inside the model's dataset folder."""

    status: str
    image: str
    labels: list[str]


def suffix_of(data: bytes) -> str | None:
    """The file suffix of image bytes: the first of their format's entry in
    models.image_formats, found from the header alone (None: no format of the table)."""
    try:
        with Image.open(io.BytesIO(data), formats=OPENERS) as image:  # reads the header only
            name = image.format
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return next((f.suffixes[0] for f in IMAGE_FORMATS if f.pillow == name), None)


def checked_labels(labels: Sequence[str], *, classes: Sequence[str], task: str,
                   new_classes: bool) -> list[str]:
    """The labels, NFC-normalised and without repeats, or InvalidRequestError saying why
    they cannot be stored: none, several for a single-label model, a class the model does
    not know (unless `new_classes`), or a name no class folder or CSV row can hold."""
    wanted = list(dict.fromkeys(unicodedata.normalize("NFC", label.strip()) for label in labels))
    if not wanted or not all(wanted):
        raise InvalidRequestError("send the image's label in the multipart field 'label' "
                                  "(repeat it for several labels of a multi-label model)")
    if task == "single_label" and len(wanted) > 1:
        raise InvalidRequestError(f"a single-label model takes one label per image, got "
                                  f"{len(wanted)}")
    unknown = [label for label in wanted if label not in classes]
    if unknown and not new_classes:
        shown = ", ".join(repr(c) for c in list(classes)[:50])
        raise InvalidRequestError(f"unknown label {unknown[0][:100]!r}; the model's classes: "
                                  f"{shown} (the server takes new classes only with "
                                  "--feedback-new-classes)")
    for label in wanted:
        problem = _name_problem(label, task)
        if problem:
            raise InvalidRequestError(f"label {label[:100]!r} cannot be stored: {problem}")
    return wanted


def _name_problem(label: str, task: str) -> str | None:
    if len(label) > MAX_LABEL_CHARS:
        return f"longer than {MAX_LABEL_CHARS} characters"
    if label.startswith(".") or label in IGNORED_NAMES:
        return "training passes over folders of that name"
    if any(c in label for c in "/\\") or not label.isprintable():
        return "a class folder name cannot hold a slash or a control character"
    if task == "multi_label" and any(c.isspace() for c in label):
        return "the labels column separates labels with spaces"
    return None


class FeedbackStore:
    """The feedback folder: each model's dataset and review folder, within their quotas."""

    def __init__(self, root: Path, *, quota_bytes: int, review_quota_bytes: int) -> None:
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.review_quota_bytes = review_quota_bytes

    def save(self, model: str, task: str, data: bytes, labels: list[str]) -> Stored:
        """Write one labelled image into the model's dataset (see the module doc)."""
        name = _file_name(data)
        with self._locked(model) as folder:
            dataset = folder / DATA
            if task == "single_label":
                return self._save_in_class(folder, dataset, name, data, labels[0])
            return self._save_with_row(folder, dataset, name, data, labels)

    def keep_for_review(self, model: str, data: bytes, details: dict[str, Any]) -> bool:
        """Keep an image in the model's review folder, and `details` with its name as one
        line of predictions.jsonl; False when it is already there or the review quota is
        reached."""
        name = _file_name(data)
        record = json.dumps({"image": name, **details}, ensure_ascii=False) + "\n"
        with self._locked(model) as folder:
            review = folder / REVIEW
            if (review / name).exists():
                return False
            if _size(review) + len(data) + len(record) > self.review_quota_bytes:
                logger.debug("model %s: review folder full; image not kept", model)
                return False
            self._place(folder, review / name, data)
            try:
                _append(review / "predictions.jsonl", record.encode())
            except StorageFullError:
                (review / name).unlink()
                raise
            return True

    # ---- single-label: class folders ----------------------------------------------------

    def _save_in_class(self, folder: Path, dataset: Path, name: str, data: bytes,
                       label: str) -> Stored:
        target = dataset / label / name
        shown = f"{label}/{name}"
        if target.exists():
            return Stored("unchanged", shown, [label])
        earlier = next((d / name for d in _subfolders(dataset) if (d / name).exists()), None)
        if earlier is not None:  # the same image with another label: the latest one counts
            target.parent.mkdir(exist_ok=True)
            os.rename(earlier, target)
            _sync_folder(target.parent)
            with contextlib.suppress(OSError):  # fit refuses an empty class folder
                earlier.parent.rmdir()
            return Stored("relabelled", shown, [label])
        self._check_quota(folder, len(data))
        self._place(folder, target, data)
        return Stored("created", shown, [label])

    # ---- multi-label: images/ and labels.csv --------------------------------------------

    def _save_with_row(self, folder: Path, dataset: Path, name: str, data: bytes,
                       labels: list[str]) -> Stored:
        image = f"{IMAGES}/{name}"
        table = dataset / LABELS_CSV
        rows = _read_rows(table)
        if image in rows:
            if set(rows[image]) == set(labels):
                return Stored("unchanged", image, rows[image])
            rows[image] = labels
            text = CSV_HEADER + "".join(_csv_row(k, v) for k, v in rows.items())
            self._check_quota(folder, len(text) - _file_size(table))
            self._place(folder, table, text.encode(), replace=True)
            return Stored("relabelled", image, labels)
        row = _csv_row(image, labels).encode()
        placed = not (dataset / image).exists()
        self._check_quota(folder, len(row) + (len(data) if placed else 0)
                          + (0 if table.exists() else len(CSV_HEADER)))
        if not table.exists():
            self._place(folder, table, CSV_HEADER.encode())
        if placed:
            self._place(folder, dataset / image, data)
        try:
            _append(table, row)
        except StorageFullError:
            if placed:
                (dataset / image).unlink()
            raise
        return Stored("created", image, labels)

    # ---- files --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, model: str) -> Iterator[Path]:
        """The model's folder, held against the other writers (threads and processes)."""
        folder = self.root / model
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _storage_error(exc, folder) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)  # and with it the lock

    def _check_quota(self, folder: Path, more: int) -> None:
        used = _size(folder / DATA)
        if used + more > self.quota_bytes:
            raise StorageFullError(f"the feedback quota of model {folder.name!r} is full "
                                   f"({used:,} of {self.quota_bytes:,} bytes used; this needs "
                                   f"{more:,} more); nothing was written")

    def _place(self, folder: Path, target: Path, data: bytes, *, replace: bool = False) -> None:
        """Write `data` to a temporary file, sync it, and rename it to `target`."""
        temporary = folder / TEMPORARY / f"{secrets.token_hex(8)}{target.suffix}"
        try:
            temporary.parent.mkdir(exist_ok=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not replace and target.exists():
                raise FileExistsError(errno.EEXIST, "written meanwhile", str(target))
            os.replace(temporary, target)
            _sync_folder(target.parent)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise _storage_error(exc, target) from exc


def _file_name(data: bytes) -> str:
    suffix = suffix_of(data)
    if suffix is None:
        raise InvalidRequestError("the file is not in a format the dataset can hold")
    return hashlib.sha256(data).hexdigest() + suffix


def _append(path: Path, data: bytes) -> None:
    """Append `data` in one write and sync it; on failure the file is cut back to its size
    before (a torn row never stays), and a torn last line left by a crash is cut first."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
            size -= len(tail) - (tail.rfind(b"\n") + 1)
            os.ftruncate(fd, size)
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], size + written)
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)
            raise _storage_error(exc, path) from exc
    finally:
        os.close(fd)


def _storage_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in FULL_ERRNOS:
        return StorageFullError(f"the feedback disk refused the write ({exc.strerror}); "
                                "nothing was written")
    logger.error("feedback: cannot write %s: %s", path, exc)
    return exc


def _read_rows(table: Path) -> dict[str, list[str]]:
    """The CSV's rows, image -> labels (the last row of an image wins; a torn end skipped)."""
    if not table.exists():
        return {}
    text = table.read_text(encoding="utf-8", errors="replace")
    text = text[:text.rfind("\n") + 1]
    rows = {}
    for record in list(csv.reader(io.StringIO(text, newline="")))[1:]:
        if record:
            rows[record[0]] = (record[1] if len(record) > 1 else "").split()
    return rows


def _csv_row(image: str, labels: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([image, " ".join(labels)])
    return out.getvalue()


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []


def _size(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
