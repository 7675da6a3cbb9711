"""`--workers N`: N server processes on one port, kept running by this one.

The supervisor reserves the port, creates the shared tables
(app.process.shared_tables) and the metrics folder, spawns the workers and then only
watches: a worker that exits or stops ticking for `worker_timeout` seconds is replaced;
SIGHUP asks every worker to rescan; SIGTERM/SIGINT reach every worker, which drains its
requests, and the supervisor exits 0 once all are gone.
It never imports torch nor serves a request itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType

from app.config import Settings
from app.metrics import MULTIPROC_ENV
from app.process.metrics_files import MetricsFolder, remove_stale_folders
from app.process.server import EXIT_CANNOT_LISTEN, WorkerEntry, serve_worker, shared_port_socket
from app.process.shared_tables import READY, STATE, ClusterTables, SharedState

logger = logging.getLogger("app.process.supervisor")

POLL_SECONDS = 0.2
START_GRACE_SECONDS = 300.0  # a worker's first tick (imports, CUDA start) may take this long
MAX_FAILED_STARTS = 3  # workers exiting in a row before any became ready: give up


@dataclass
class _Slot:
    """One worker position: its current process and how it has fared."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    seen_ready: bool = False
    restart_at: float = 0.0  # when to start the next process after a failure


class Supervisor:
    """Spawns and replaces the worker processes; relays stop and reload signals."""

    def __init__(self, settings: Settings, workers: int, entry: WorkerEntry | None) -> None:
        self.settings = settings
        self.workers = workers
        self.entry = entry
        self.context = multiprocessing.get_context("spawn")  # no state of ours is forked
        self.tables = ClusterTables.create(workers, self.context,
                                           worker_timeout=settings.worker_timeout)
        self.state = SharedState(self.tables)
        self.slots = [_Slot(i) for i in range(workers)]
        self.stopping = False
        self.failed_starts = 0
        self.gave_up = False
        self.metrics_folder: MetricsFolder | None = None

    def run(self) -> int:
        """Serve until told to stop; returns the exit status."""
        stale = remove_stale_folders()
        if stale:
            logger.info("removed %d metrics folders left by supervisors that were killed: %s",
                        len(stale), ", ".join(map(str, stale)))
        # bound, never listening: it holds the port (and with port 0 picks it) for the
        # workers, which each listen on it
        port_holder = shared_port_socket(self.settings.host, self.settings.port)
        port = port_holder.getsockname()[1]
        self.metrics_folder = MetricsFolder.claim()
        # read by each worker's prometheus_client
        os.environ[MULTIPROC_ENV] = str(self.metrics_folder.path)
        # each worker knows the port and how many share the host (see app.main.host_threads)
        worker_settings = self.settings.model_copy(update={"port": port,
                                                           "workers": self.workers})
        self._install_signals()
        logger.info("supervisor %d: %d workers on http://%s:%d", os.getpid(), self.workers,
                    self.settings.host, port)
        try:
            while not self.stopping:
                for slot in self.slots:
                    self._tend(slot, worker_settings)
                time.sleep(POLL_SECONDS)
            self._stop_all()
        finally:
            port_holder.close()
            self.metrics_folder.remove()
        return 1 if self.gave_up else 0

    def _install_signals(self) -> None:
        def stop(sig: int, frame: FrameType | None) -> None:
            if not self.stopping:
                logger.info("signal %d: stopping %d workers", sig, self.workers)
            self.stopping = True

        def rescan(sig: int, frame: FrameType | None) -> None:
            if self.settings.reload_on_sighup:
                logger.info("SIGHUP: every worker rescans %s", self.settings.checkpoint_dir)
                self.state.request_reload(self.workers)
            else:
                logger.info("SIGHUP ignored (reload_on_sighup is off)")

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        signal.signal(signal.SIGHUP, rescan)

    def _tend(self, slot: _Slot, worker_settings: Settings) -> None:
        """Start, watch or replace the worker in `slot`."""
        process = slot.process
        if process is None:
            if time.monotonic() >= slot.restart_at:
                self._start(slot, worker_settings)
            return
        if process.exitcode is not None:
            self._reap(slot, process.exitcode)
            return
        if self.state.rows[slot.index, STATE] == READY and self.state.pid(slot.index):
            if not slot.seen_ready:
                self.failed_starts = 0
            slot.seen_ready = True
        age = self.state.heartbeat_age(slot.index)
        if age is None:  # not ticking yet: starting up
            silent = time.monotonic() - slot.started_at
            stalled = silent > START_GRACE_SECONDS
        else:
            silent = age
            stalled = age > self.settings.worker_timeout
        if stalled and process.pid:
            logger.error("worker %d (pid %d) has not ticked for %.1f s; replacing it",
                         slot.index, process.pid, silent)
            os.kill(process.pid, signal.SIGKILL)
            process.join(5)

    def _start(self, slot: _Slot, worker_settings: Settings) -> None:
        process = self.context.Process(
            target=serve_worker,
            args=(worker_settings, self.tables, slot.index, self.entry, os.getpid()),
            name=f"worker-{slot.index}", daemon=False)
        process.start()
        slot.process, slot.started_at, slot.seen_ready = process, time.monotonic(), False
        logger.info("worker %d started (pid %d)", slot.index, process.pid)

    def _reap(self, slot: _Slot, exitcode: int) -> None:
        """A worker has exited: forget its state and plan its replacement."""
        pid = slot.process.pid if slot.process else 0
        self.state.clear(slot.index)
        if pid and self.metrics_folder is not None:
            self.metrics_folder.archive_dead(pid)  # its counts stay in the totals
        slot.process = None
        if self.stopping:
            return
        logger.error("worker %d (pid %s) exited with status %s", slot.index, pid, exitcode)
        if exitcode == EXIT_CANNOT_LISTEN:
            self._give_up("a worker could not listen on the port")
        elif not slot.seen_ready:
            self.failed_starts += 1
            if self.failed_starts >= MAX_FAILED_STARTS:
                self._give_up(f"{self.failed_starts} workers in a row exited before serving")
        slot.restart_at = time.monotonic() + min(30.0, 0.5 * 2 ** self.failed_starts)
        if not self.stopping:
            logger.info("worker %d: a new one starts in %.1f s", slot.index,
                        slot.restart_at - time.monotonic())

    def _give_up(self, why: str) -> None:
        logger.error("stopping the server: %s (see the workers' log lines above)", why)
        self.gave_up = self.stopping = True

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them to drain, kill what is left."""
        live = [s.process for s in self.slots if s.process is not None and s.process.pid]
        for process in live:
            if process.exitcode is None and process.pid:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + 10.0
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None and process.pid:
                logger.error("worker pid %d still running after the shutdown timeout; "
                             "killing it", process.pid)
                os.kill(process.pid, signal.SIGKILL)
                process.join(5)
        for slot in self.slots:
            self.state.clear(slot.index)
        logger.info("supervisor: every worker has stopped")


def supervise(settings: Settings, workers: int, entry: WorkerEntry | None = None) -> int:
    """Run `workers` server processes on one port until SIGTERM/SIGINT; the exit status."""
    if not hasattr(socket, "SO_REUSEPORT"):
        logger.error("--workers above 1 needs SO_REUSEPORT (Linux); use --workers 1 here")
        return 2
    try:
        return Supervisor(settings, workers, entry).run()
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
