"""A benchmarked server's process tree: start it, wait until it answers, account its CPU, stop it.

CPU time comes from bench.load's /proc snapshots (every thread of the server process and of
its descendants); here it is grouped by process role: the process that was started is the
`supervisor` when it has child processes (worker processes, LitServe's API servers and
inference workers) and the `server` when it works alone; every descendant is a `worker`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.load import thread_cpu

logger = logging.getLogger(__name__)

Snapshot = dict[str, tuple[str, float]]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: Sequence[str], log: Path, env: dict[str, str],
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` (in `cwd`: the checkout whose code it runs) with its output in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Return once `url` answers 200; RuntimeError when the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before {url} "
                               "answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def tree_pids(root: int) -> set[int]:
    """The process `root` and its living descendants."""
    return {int(key.split("/", 1)[0]) for key in thread_cpu(root)} | {root}


def _started_at(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process, wait, then SIGKILL whatever of its tree is left, by process id."""
    alive = process.poll() is None
    tree = {pid: _started_at(pid) for pid in tree_pids(process.pid)} if alive else {}
    if alive:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("server %d ignored SIGTERM for %.0f s; killing it", process.pid,
                           grace_s)
    for pid, started in sorted(tree.items()):
        if pid != process.pid and started is not None and _started_at(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.wait()


def cpu_by_role(before: Snapshot, after: Snapshot, root: int) -> dict[str, float]:
    """CPU seconds spent between two snapshots of `root`'s tree, summed by process role."""
    pids = {int(key.split("/", 1)[0]) for key in after}
    root_role = "supervisor" if pids - {root} else "server"
    spent: dict[str, float] = defaultdict(float)
    for key, (_, seconds) in after.items():
        pid = int(key.split("/", 1)[0])
        spent[root_role if pid == root else "worker"] += seconds - before.get(key, ("", 0.0))[1]
    return {role: s for role, s in sorted(spent.items()) if s > 0}

