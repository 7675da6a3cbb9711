"""The images a `predict` run classifies, in one fixed order, from the sources given.

A source is a folder (every image file under it, recursively, sorted; hidden files and
folders passed over as `fit` does), a CSV with an `image` column, a text file of paths (one a
line; blank lines and lines starting with `#` skipped), or one image file. Paths in a CSV or
text file are relative to that file's folder, or absolute. The order is the order of the
sources, then each source's own order, so that the same sources always list the same images
in the same order: the row number of an output file is where a run resumes.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from training.data.discovery import IMAGE_SUFFIXES, is_ignored_name
from training.exceptions import CsvFormatError, DataError

logger = logging.getLogger(__name__)

CSV_COLUMN = "image"


def list_images(sources: Sequence[Path]) -> list[Path]:
    """Every image named by `sources`, in order (DataError for a missing or empty source)."""
    images: list[Path] = []
    for source in sources:
        found = _one_source(Path(source))
        if not found:
            raise DataError(f"{source}: no images found")
        logger.info("%s: %d images", source, len(found))
        images.extend(found)
    return images


def _one_source(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                      and not any(is_ignored_name(part) for part in p.relative_to(source).parts)
                      and p.is_file())
    if not source.is_file():
        raise DataError(f"{source}: no such file or folder")
    suffix = source.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [source]
    text = _read_text(source)
    if suffix == ".csv":
        return [source.parent / name for name in _csv_images(source, text)]
    return [source.parent / line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); a list "
                        "of images is a folder, a CSV with an 'image' column or a text file "
                        "of paths") from exc


def _csv_images(path: Path, text: str) -> list[str]:
    """The non-empty cells of the CSV's `image` column, in row order."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [cell.strip().lower() for cell in next(reader, [])]
        if CSV_COLUMN not in header:
            raise CsvFormatError(f"{path}: no {CSV_COLUMN!r} column in the header "
                                 f"{','.join(header)!r}")
        column = header.index(CSV_COLUMN)
        return [row[column].strip() for row in reader
                if len(row) > column and row[column].strip()]
    except csv.Error as exc:
        raise CsvFormatError(f"{path}:{reader.line_num}: {exc}") from exc
