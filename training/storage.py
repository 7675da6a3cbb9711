"""The run's output folder: checked before the run, prepared at its start, written atomically
(models.atomic), write failures as one-line errors."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from models.atomic import TEMP_PREFIX, write_file
from models.checkpoint import CARD_FILE, WEIGHTS_FILE
from training.config import RESUME_FILE, TrainConfig
from training.exceptions import DiskFullError, OutputError

logger = logging.getLogger(__name__)

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
CHECKPOINT_FILES = (CARD_FILE, WEIGHTS_FILE, RESUME_FILE)  # any of them: a run lives here


def output_error(path: Path, exc: OSError) -> OutputError:
    """The one-line error for a failed write under `path`."""
    if exc.errno in _DISK_FULL_ERRNOS:
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


def check_output(cfg: TrainConfig) -> None:
    """Refuse an --output that is a file, or that holds a checkpoint this run would replace."""
    out = cfg.output
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file; it must be a folder (new or existing)")
    if cfg.resume is not None or cfg.overwrite or not out.is_dir():
        return
    held = [name for name in CHECKPOINT_FILES if (out / name).exists()]
    if held:
        raise OutputError(f"--output {out} already holds a checkpoint ({', '.join(held)}); pass "
                          "--overwrite to replace it, --resume to continue its run, or choose "
                          "another folder")


def prepare_output(cfg: TrainConfig) -> None:
    """Create the output folder, clear what killed writes left, drop a replaced state."""
    with write_errors(cfg.output):
        cfg.output.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cfg.output)
        if cfg.overwrite and (cfg.output / RESUME_FILE).exists():
            (cfg.output / RESUME_FILE).unlink()
            logger.info("--overwrite: removed the previous run's %s", RESUME_FILE)
