"""The output of `predict`: one row per image, as JSON Lines or CSV, appended so that a crash
or a kill never loses a written row nor leaves a broken one behind.

Rows are appended in batches, each batch written whole and then fsync'ed. Opening a file
again (`RowFile.open`) keeps the longest run of complete rows from its start and cuts off
whatever follows: the torn end of a batch a crash interrupted (a line without its newline,
or bytes the disk never received). The number of rows kept is where the run resumes.

JSON Lines: `{"path", "predictions": [{"label", "score"}], "scores"?, "unknown"?,
"unknown_score"?}` or `{"path", "error"}`, the fields of /predict's results. CSV: the same
fields as columns, `predictions` and `scores` as JSON text.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from training.exceptions import ConfigError, DiskFullError, OutputError

logger = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
CSV_COLUMNS = ("path", "predictions", "unknown", "unknown_score", "error")
SCORES_COLUMN = "scores"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
Row = dict[str, Any]


def output_format(path: Path) -> str:
    """"jsonl" or "csv", from the output file's suffix (ConfigError for another one)."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ConfigError(f"--output {path}: the suffix says the format; use .jsonl "
                          "(JSON Lines) or .csv") from None


@dataclass(frozen=True)
class Kept:
    """What a reopened file holds: each complete row's path and whether it is an error, and
    the byte range of the rows (after a CSV header)."""

    paths: list[str]
    errors: int
    start: int
    end: int


class RowFile:
    """An output file open for appending whole, durable batches of rows."""

    def __init__(self, path: Path, fmt: str, columns: Sequence[str], fd: int,
                 kept: Kept) -> None:
        self.path, self.format, self.columns = path, fmt, tuple(columns)
        self.kept = kept
        self._fd = fd

    @classmethod
    def open(cls, path: Path, *, all_scores: bool = False) -> RowFile:
        """Open (or create) `path`, keep its complete rows and cut off anything after them."""
        fmt = output_format(path)
        columns = (*CSV_COLUMNS, SCORES_COLUMN) if all_scores else CSV_COLUMNS
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"--output {path}: cannot be opened ({exc.strerror})") from exc
        try:
            with os.fdopen(os.dup(fd), "rb") as reader:
                kept = (_keep_jsonl(path, reader) if fmt == "jsonl"
                        else _keep_csv(path, reader, columns))
            size = os.fstat(fd).st_size
            if kept.end < size:
                logger.warning("%s: cut off %d bytes after its last complete row (a run that "
                               "stopped mid-write)", path, size - kept.end)
                os.ftruncate(fd, kept.end)
            os.lseek(fd, kept.end, os.SEEK_SET)
            out = cls(path, fmt, columns, fd, kept)
            if fmt == "csv" and kept.end == 0:
                out._write(_csv_line(columns))
                out.kept = Kept([], 0, os.lseek(fd, 0, os.SEEK_CUR),
                                os.lseek(fd, 0, os.SEEK_CUR))
            return out
        except BaseException:
            os.close(fd)
            raise

    def append(self, rows: Sequence[Row]) -> None:
        """Write `rows` at the end in one go and make them durable (fsync)."""
        if not rows:
            return
        if self.format == "jsonl":
            text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
                           for row in rows)
        else:
            text = "".join(_csv_line([_csv_cell(row.get(c)) for c in self.columns])
                           for row in rows)
        self._write(text)

    def _write(self, text: str) -> None:
        self._write_bytes(text.encode("utf-8", "surrogateescape"), sync=True)

    def _write_bytes(self, chunk: bytes, *, sync: bool = False) -> None:
        data = memoryview(chunk)
        try:
            while data:
                data = data[os.write(self._fd, data):]
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise DiskFullError(f"{self.path}: the disk is full ({exc.strerror}); free "
                                    "space and run again to continue") from exc
            raise OutputError(f"{self.path}: cannot be written ({exc.strerror})") from exc

    def copy_rows_from(self, other: Path, *, all_scores: bool) -> None:
        """Append the complete rows of the file `other` (same format) to this one."""
        source = RowFile.open(other, all_scores=all_scores)
        try:
            with open(other, "rb") as reader:
                reader.seek(source.kept.start)
                remaining = source.kept.end - source.kept.start
                while remaining > 0:
                    chunk = reader.read(min(remaining, 1 << 20))
                    remaining -= len(chunk)
                    self._write_bytes(chunk, sync=remaining <= 0)
        finally:
            source.close()

    def truncate(self, size: int) -> None:
        """Cut the file back to `size` bytes and append from there."""
        os.ftruncate(self._fd, size)
        os.lseek(self._fd, size, os.SEEK_SET)
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of a complete output file, as dicts (CSV cells parsed back)."""
    fmt = output_format(path)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            yield from (json.loads(line) for line in f if line.strip())
            return
        for record in csv.DictReader(f):
            yield {k: _csv_value(k, v) for k, v in record.items() if v != ""}


def _keep_jsonl(path: Path, reader: BinaryIO) -> Kept:
    paths, errors, end = [], 0, 0
    for line in reader:
        try:
            row = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            if not paths and line.endswith(b"\n"):
                raise OutputError(f"--output {path}: its first line is not a row of predict's; "
                                  "choose another --output, or delete it to start again")
            break
        paths.append(row["path"])
        errors += "error" in row
        end += len(line)
    return Kept(paths, errors, 0, end)


def _keep_csv(path: Path, reader: BinaryIO, columns: Sequence[str]) -> Kept:
    header = _csv_line(columns).encode()
    first = reader.read(len(header))
    if header.startswith(first):  # nothing, or a header cut short: written again
        if len(first) < len(header):
            return Kept([], 0, 0, 0)
    else:
        raise OutputError(
            f"--output {path}: its first line is not the header this run writes "
            f"({','.join(columns)}); it was written with other options or by something "
            "else: choose another --output, or delete it to start again")
    lines = _Counted(reader, len(header))
    paths, errors, end = [], 0, len(header)
    error_column = columns.index("error")
    try:
        for record in csv.reader(lines, strict=True):
            if len(record) != len(columns) or not lines.at_line_end:
                break
            paths.append(record[0])
            errors += bool(record[error_column])
            end = lines.consumed
    except csv.Error:
        pass  # an open quote at the end: a row cut short
    return Kept(paths, errors, len(header), end)


class _Counted:
    """A binary file's lines as text, and how many bytes have been handed out (for the CSV
    reader, which reads a line at a time; a UTF-8 character never holds a newline byte)."""

    def __init__(self, reader: BinaryIO, consumed: int) -> None:
        self._reader = reader
        self.consumed = consumed
        self.at_line_end = False

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> str:
        line = self._reader.readline()
        if not line:
            raise StopIteration
        self.consumed += len(line)
        self.at_line_end = line.endswith(b"\n")
        return line.decode("utf-8", "surrogateescape")


def _csv_line(cells: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    return str(value)


def _csv_value(column: str, text: str) -> Any:
    if column in ("predictions", SCORES_COLUMN):
        return json.loads(text)
    if column == "unknown":
        return text == "true"
    if column == "unknown_score":
        return float(text)
    return text
