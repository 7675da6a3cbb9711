"""The folder of prometheus_client's multiprocess files (`--workers N`): claimed, bounded, freed.

Each worker writes its counters and histograms to files named by its pid, and a scrape reads
every file in the folder. Left alone, each replaced worker would leave its files for the
supervisor's life (a scrape's cost growing with them) and a supervisor killed with SIGKILL
would leave the whole folder behind. So:

- the supervisor and every worker hold a shared lock on the folder's owner file while they
  run; the next supervisor to start removes those of our folders nobody holds any more;
- when a worker has exited, its counters and histograms are added into one archive file per
  kind and its own files are removed, so totals never drop and the folder holds at most one
  file per kind per live worker plus the archives;
- that swap happens under an exclusive lock that a scrape takes shared, so a scrape never
  sees a dead worker's counts twice or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict

logger = logging.getLogger(__name__)

FOLDER_PREFIX = "resnet-serve-metrics-"
OWNER_FILE = ".owner"  # shared-locked by every live process using the folder
MERGE_LOCK = ".merge.lock"  # exclusive while an archive is rewritten, shared while scraping
ARCHIVE_PID = "archive"  # `counter_archive.db`: what every dead worker counted
SUMMED_KINDS = ("counter", "histogram", "summary")  # values that add up over processes


def _lock(path: Path, operation: int) -> int | None:
    """Open `path` (never through a symlink) and flock it; the descriptor, or None when
    the file cannot be opened (missing, a symlink) or the lock is taken (with LOCK_NB)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def hold_folder(folder: Path) -> int | None:
    """Mark this process as a user of `folder` for its life (the descriptor to keep open)."""
    return _lock(folder / OWNER_FILE, fcntl.LOCK_SH)


@contextlib.contextmanager
def scrape_lock(folder: Path) -> Iterator[None]:
    """Held around reading the folder, so no archive is rewritten meanwhile."""
    fd = _lock(folder / MERGE_LOCK, fcntl.LOCK_SH)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


class MetricsFolder:
    """The supervisor's folder: created empty, tidied as workers exit, removed at the end."""

    def __init__(self, path: Path, owner_fd: int) -> None:
        self.path = path
        self._owner_fd = owner_fd

    @classmethod
    def claim(cls, parent: Path | None = None) -> MetricsFolder:
        """A new folder under `parent` (the temporary folder), held by this process.

        It is built under a hidden name and renamed once its owner file is locked, so a
        cleanup running in another supervisor never sees it unheld.
        """
        parent = Path(parent or tempfile.gettempdir())
        staging = Path(tempfile.mkdtemp(prefix="." + FOLDER_PREFIX, dir=parent))
        fd = os.open(staging / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.close(os.open(staging / MERGE_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        final = parent / staging.name[1:]
        os.rename(staging, final)
        return cls(final, fd)

    def archive_dead(self, pid: int) -> None:
        """Fold exited worker `pid`'s files into the archives and remove them."""
        multiprocess.mark_process_dead(pid, str(self.path))  # its live gauges
        fd = _lock(self.path / MERGE_LOCK, fcntl.LOCK_EX)
        try:
            for kind in SUMMED_KINDS:
                dead = self.path / f"{kind}_{pid}.db"
                if dead.exists():
                    _add_into(self.path / f"{kind}_{ARCHIVE_PID}.db", dead)
                    dead.unlink()
        finally:
            if fd is not None:
                os.close(fd)

    def remove(self) -> None:
        """Delete the folder (every worker has stopped)."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._owner_fd)


def _add_into(archive: Path, dead: Path) -> None:
    """Rewrite `archive` as itself plus every value in `dead`, replacing it atomically."""
    totals: dict[str, float] = {}
    for source in (archive, dead):
        if source.exists():
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(
                    str(source)):
                totals[key] = totals.get(key, 0.0) + value
    staging = archive.with_name(archive.name + ".new")  # not *.db: no scrape reads it
    staging.unlink(missing_ok=True)
    values = MmapedDict(str(staging))
    try:
        for key, value in totals.items():
            values.write_value(key, value, 0.0)
    finally:
        values.close()
    os.replace(staging, archive)


def remove_stale_folders(parent: Path | None = None) -> list[Path]:
    """Remove our folders under `parent` that no live process holds (left by a supervisor
    killed with SIGKILL); returns those removed.

    Only real folders named like ours, owned by this user and holding an owner file are
    considered; one whose owner file any process still locks is in use and kept.
    """
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(FOLDER_PREFIX)]
    except OSError:
        return []
    for folder in candidates:
        try:
            info = folder.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            continue
        fd = _lock(folder / OWNER_FILE, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:  # in use, or not one of ours
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(folder)
    return removed
