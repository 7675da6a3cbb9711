"""The multiprocess metrics folder: dead workers folded into archives, stale folders removed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.metrics import MULTIPROC_ENV, Metrics
from app.process.metrics_files import FOLDER_PREFIX, MetricsFolder, remove_stale_folders

ROOT = Path(__file__).resolve().parents[2]
# gauges summed over the live workers only: a dead worker's values leave with it
LIVE_GAUGES = tuple(f"resnet_serve_{name}" for name in (
    "workers_ready", "connections_open", "models_loaded", "queue_depth"))

# a worker's life in a few lines: its counters and histograms land in files named by its pid.
# Workers are forked from one process that imported the app once (a worker's own import,
# torch included, took seconds): one line in, one worker lived and gone, its pid out.
WORKERS = """
import os, sys
from app.metrics import Metrics
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        metrics = Metrics(multiprocess_mode=True)
        for status in (200, 200, 404):
            metrics.observe_request("/predict", "POST", status, 0.02)
        metrics.batcher_hook("colors")("batch", 3)
        metrics.batcher_hook("colors")("rejected", 2)
        metrics.watch_workers(lambda: 1)
        print(os.getpid(), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


@contextlib.contextmanager
def _workers(folder: Path) -> Iterator[Callable[[], int]]:
    """A function that runs one worker's life to its end and returns its (dead) pid."""
    parent = subprocess.Popen([sys.executable, "-c", WORKERS], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, MULTIPROC_ENV: str(folder)})

    def live() -> int:
        parent.stdin.write("go\n")
        parent.stdin.flush()
        return int(parent.stdout.readline())

    try:
        yield live
    finally:
        parent.stdin.close()
        if parent.wait(60) != 0:
            raise AssertionError("the worker-forking process failed")


def _samples(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))
    text = Metrics(multiprocess_mode=True).render().decode()
    return sorted(line for line in text.splitlines() if not line.startswith("#"))


def test_dead_workers_fold_into_one_archive_per_kind_and_totals_hold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = MetricsFolder.claim(tmp_path)
    with _workers(folder.path) as live:
        pids = [live() for _ in range(3)]
        before = _samples(folder.path, monkeypatch)
        assert ('resnet_serve_requests_total{method="POST",route="/predict",status="200"} 6.0'
                in before)
        assert 'resnet_serve_batch_size_count{model="colors"} 3.0' in before
        for pid in pids:
            folder.archive_dead(pid)
        assert sorted(p.name for p in folder.path.glob("*.db")) == [
            "counter_archive.db", "histogram_archive.db"]
        after = _samples(folder.path, monkeypatch)
        assert after == [line for line in before if not line.startswith(LIVE_GAUGES)]
        folder.archive_dead(live())  # a fourth adds to the archive
        assert 'resnet_serve_images_rejected_total{model="colors"} 8.0' in _samples(
            folder.path, monkeypatch)
    folder.remove()
    assert not folder.path.exists()


def test_a_killed_supervisors_folder_is_removed_and_folders_in_use_are_kept(
        tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from app.process.metrics_files import MetricsFolder; "
         "print(MetricsFolder.claim(Path(sys.argv[1])).path, flush=True); time.sleep(60)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        killed = Path(holder.stdout.readline().strip())
        (killed / "counter_123.db").write_bytes(b"x")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        holder.kill()
    live = MetricsFolder.claim(tmp_path)
    unowned = tmp_path / f"{FOLDER_PREFIX}not-ours"  # no owner file: not made by us
    unowned.mkdir()
    assert remove_stale_folders(tmp_path) == [killed]
    assert not killed.exists() and live.path.exists() and unowned.exists()
    live.remove()
