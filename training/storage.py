"""Writing the run's files: atomically through models.atomic, failures as one-line errors."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from models.atomic import TEMP_PREFIX, write_file
from training.errors import DiskFullError, OutputError

logger = logging.getLogger(__name__)

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def output_error(path: Path, exc: OSError) -> OutputError:
    """The one-line error for a failed write under `path`."""
    if exc.errno in _FULL:
        return DiskFullError(f"no space left on {path} ({exc.strerror}); nothing half-written "
                             "was kept, the last good checkpoint and resume state are intact")
    return OutputError(f"cannot write {exc.filename or path}: {exc.strerror or exc}")


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError raised by writes under `path` into an OutputError naming it."""
    try:
        yield
    except OSError as exc:
        raise output_error(path, exc) from exc


def write_atomically(path: Path, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write bytes, text (UTF-8) or a file-writing function's output to `path` atomically."""
    with write_errors(path):
        write_file(path, data.encode() if isinstance(data, str) else data)


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files that a killed write left in `folder`."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"{TEMP_PREFIX}*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            logger.info("removed %s, left by an interrupted write", leftover)
