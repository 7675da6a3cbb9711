"""Atomic writes: a file through a fixed temp name beside it, a folder of files as one unit.

A unit is staged in a hidden folder beside its target, every file synced, then swapped into
place with one rename (Linux: an atomic exchange of the two folders), so a reader sees the old
unit or the new one, never a mix. Temp names are fixed, not random: a write killed half-way
leaves one leftover that the next write of the same target replaces, not a pile. Everything is
created with the umask's mode, like any other file the process writes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

Writer = Callable[[Path], None]


def temp_path(path: Path) -> Path:
    """The fixed temp name for `path` (same folder, same suffix, hidden)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}")


def write_file(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to `path` through its temp
    name, synced, then renamed over `path`; the temp is removed on failure."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_unit(target: Path, files: Mapping[str, bytes], writers: Mapping[str, Writer],
               *, replaces: Collection[str] = ()) -> None:
    """Make `target` hold `files` and what `writers` write, swapped in as one unit.

    Entries of the old `target` that the unit does not write (and that are not named in
    `replaces`) are carried over as hard links, so the folder's other contents stay.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    _recover(target)
    if target.is_dir() and os.path.ismount(target):
        _write_in_place(target, files, writers)
        return
    staging = _sibling(target, "staging")
    _remove(staging)
    staging.mkdir()
    try:
        for name, data in files.items():
            write_file(staging / name, data)
        for name, write in writers.items():
            write(staging / name)
        if target.is_dir():
            _carry_over(target, staging, skip={*files, *writers, *replaces})
        _fsync_dir(staging)
        _swap_into_place(staging, target)
    except BaseException:
        _remove(staging)
        raise


def _sibling(target: Path, role: str) -> Path:
    return target.with_name(f".{target.name}.{role}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _recover(target: Path) -> None:
    """Put back a unit that a write killed between its two renames had moved aside."""
    old = _sibling(target, "old")
    if not target.exists() and old.is_dir():
        os.rename(old, target)
        logger.warning("restored %s from %s (a previous write was interrupted)", target, old)
    else:
        _remove(old)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, *, skip: Collection[str]) -> None:
    for entry in os.scandir(old):
        if entry.name in skip or entry.name.startswith(TEMP_PREFIX):
            continue
        dst = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc / not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        _remove(staging)  # it now holds the old unit
    else:
        old = _sibling(target, "old")
        os.rename(target, old)
        os.rename(staging, target)
        _remove(old)
    _fsync_dir(target.parent)


def _write_in_place(target: Path, files: Mapping[str, bytes], writers: Mapping[str, Writer]
                    ) -> None:
    """For a target that is a mount point (it cannot be renamed): file by file, last file
    last, so a reader that checks the last file against the others sees any mix."""
    for name, write in writers.items():
        tmp = temp_path(target / name)
        try:
            write(tmp)
            os.replace(tmp, target / name)
        finally:
            tmp.unlink(missing_ok=True)
    for name, data in files.items():
        write_file(target / name, data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
