"""What the server's worker processes share: readiness, heartbeats, reloads and queue room.

With `--workers N` the supervisor (app.supervisor) creates these tables in shared memory
before it spawns the workers, and each worker sees them through a `WorkerLink`. Every cell
has one writer (a worker writes its own row, the supervisor clears a dead worker's row), so
no lock is needed and a worker that dies mid-write can never wedge the others.

A worker counts as ready only while its heartbeat is fresh (`stale_after` seconds, well under
`worker_timeout`): a stopped or stalled worker still holds its share of the port's new
connections, so `/ready` turns 503 long before the supervisor replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import zlib
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import SynchronizedBase
from typing import TYPE_CHECKING, Any

import numpy as np

from app.config import available_cpus
from app.exceptions import CheckpointFolderError, ShuttingDownError

if TYPE_CHECKING:
    from app.metrics import Metrics
    from app.registry import ModelRegistry, ReloadReport

logger = logging.getLogger(__name__)

QUEUE_SLOTS = 4096  # model names hash into these; two names in one slot share one bound
TICK_SECONDS = 0.1  # how often a worker publishes its state and looks for reload requests
READY_HEARTBEAT_SECONDS = 3.0  # a heartbeat older than this (at most) is not ready

# the fields of a worker's row
PID, STATE, HEARTBEAT_NS, RELOADED = range(4)
ROW_FIELDS = 4
# a worker's states
STARTING, READY, STOPPING = 0, 1, 2


@dataclass(frozen=True)
class ClusterTables:
    """The shared-memory tables, passed to each spawned worker (picklable while spawning)."""

    workers: int
    rows: Any  # int64 [workers, ROW_FIELDS]
    reload_requests: Any  # int64 [workers + 1]: requests made by each worker, then SIGHUPs
    queue_held: Any  # int64 [workers, QUEUE_SLOTS]: images each worker holds, per model
    stale_after: float = READY_HEARTBEAT_SECONDS  # heartbeat age beyond which: not ready

    @classmethod
    def create(cls, workers: int, context: BaseContext, *,
               worker_timeout: float = 30.0) -> ClusterTables:
        """Zeroed tables for `workers` processes replaced after `worker_timeout` s silent."""
        return cls(workers, context.RawArray("q", workers * ROW_FIELDS),
                   context.RawArray("q", workers + 1),
                   context.RawArray("q", workers * QUEUE_SLOTS),
                   ready_heartbeat_limit(worker_timeout))


def ready_heartbeat_limit(worker_timeout: float) -> float:
    """Seconds a worker may go without ticking and still count as ready: a few seconds,
    well under `worker_timeout` (a tenth of a second is one tick)."""
    return min(READY_HEARTBEAT_SECONDS, max(10 * TICK_SECONDS, worker_timeout / 3))


def _view(raw: SynchronizedBase | Any, *shape: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.int64).reshape(shape)


class SharedState:
    """Numpy views over the tables, with the reads both sides need."""

    def __init__(self, tables: ClusterTables) -> None:
        self.workers = tables.workers
        self.stale_after = tables.stale_after
        self.rows = _view(tables.rows, tables.workers, ROW_FIELDS)
        self.reload_requests = _view(tables.reload_requests, tables.workers + 1)
        self.queue_held = _view(tables.queue_held, tables.workers, QUEUE_SLOTS)

    def clear(self, index: int) -> None:
        """Forget worker `index` (it has exited): not ready, holding nothing."""
        self.rows[index, :] = 0
        self.queue_held[index, :] = 0

    def ready_count(self) -> int:
        """Workers that are up, serving, not stopping and ticking (a stalled or stopped
        worker still takes its share of new connections, which hang)."""
        beats = self.rows[:, HEARTBEAT_NS]
        fresh = (beats != 0) & (time.monotonic_ns() - beats <= self.stale_after * 1e9)
        return int(np.count_nonzero((self.rows[:, PID] != 0) & (self.rows[:, STATE] == READY)
                                    & fresh))

    def reload_target(self) -> int:
        """Reload requests made so far, by anyone."""
        return int(self.reload_requests.sum())

    def request_reload(self, requester: int) -> int:
        """Ask every worker to rescan (requester: a worker's index, or `workers` for the
        supervisor); returns the target each worker's RELOADED must reach."""
        self.reload_requests[requester] += 1
        return self.reload_target()

    def heartbeat_age(self, index: int) -> float | None:
        """Seconds since worker `index` last ticked; None before its first tick."""
        beat = int(self.rows[index, HEARTBEAT_NS])
        return None if beat == 0 else (time.monotonic_ns() - beat) / 1e9

    def pid(self, index: int) -> int:
        """The process id worker `index` wrote when it started (0: none running)."""
        return int(self.rows[index, PID])


def queue_slot(model: str) -> int:
    """The slot of the shared queue table that counts `model`'s images."""
    return zlib.crc32(model.encode()) % QUEUE_SLOTS


class LocalQueueBound:
    """Room for at most `max_queue` images, counted in this process only."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._held = 0

    def try_add(self, count: int) -> bool:
        """Count `count` more images if they fit; False (nothing counted) if not."""
        if self._held + count > self.max_queue:
            return False
        self._held += count
        return True

    def remove(self, count: int) -> None:
        """`count` images have left the queue (run, dropped or failed)."""
        self._held -= count

    def held(self) -> int:
        """Images counted against the bound now."""
        return self._held


class SharedQueueBound:
    """Room for at most `max_queue` images of one model across every worker.

    Each worker adds to its own cell, then reads the column: it counts first and checks
    after, so two workers racing for the last room may both be refused, but together they
    never pass the bound.
    """

    def __init__(self, state: SharedState, index: int, model: str, max_queue: int) -> None:
        self.max_queue = max_queue
        self._column = state.queue_held[:, queue_slot(model)]
        self._index = index

    def try_add(self, count: int) -> bool:
        """Count `count` more images if they fit; False (nothing counted) if not."""
        self._column[self._index] += count
        if int(self._column.sum()) > self.max_queue:
            self._column[self._index] -= count
            return False
        return True

    def remove(self, count: int) -> None:
        """`count` images have left this worker's queue."""
        self._column[self._index] -= count

    def held(self) -> int:
        """Images counted against the bound now, by every worker."""
        return int(self._column.sum())


class WorkerLink:
    """One worker's view of the others: it publishes its own state and answers for all."""

    def __init__(self, tables: ClusterTables, index: int) -> None:
        self.state = SharedState(tables)
        self.index = index
        self.workers = tables.workers
        self._row = self.state.rows[index]
        self._claimed = 0  # the reload target this worker has served or is serving now
        self._row[:] = 0
        self._row[PID] = os.getpid()

    def queue_bound(self, model: str, max_queue: int) -> SharedQueueBound:
        """The bound on `model`'s queue shared by every worker."""
        return SharedQueueBound(self.state, self.index, model, max_queue)

    def all_ready(self) -> bool:
        """True when every worker is up, serving and not stopping."""
        return self.state.ready_count() == self.workers

    def ready_count(self) -> int:
        """How many workers are ready now."""
        return self.state.ready_count()

    def publish(self, registry: ModelRegistry) -> None:
        """Write this worker's heartbeat and state."""
        self._row[STATE] = (STOPPING if registry.closing else
                            READY if registry.ready else STARTING)
        self._row[HEARTBEAT_NS] = time.monotonic_ns()

    async def run(self, registry: ModelRegistry, metrics: Metrics,
                  initial_load: asyncio.Task[None]) -> None:
        """Tick until cancelled: heartbeat, state, metrics, and reloads asked of everyone."""
        self._claimed = self.state.reload_target()  # the first scan covers earlier requests
        while True:
            self.publish(registry)
            metrics.refresh()
            target = self.state.reload_target()
            if initial_load.done() and self._row[RELOADED] < self._claimed:
                self._row[RELOADED] = self._claimed
            if initial_load.done() and target > self._claimed and not registry.closing:
                self._claimed = target
                await reload_logged(registry)
                self._row[RELOADED] = max(int(self._row[RELOADED]), target)
            await asyncio.sleep(TICK_SECONDS)

    async def reload_everywhere(self, registry: ModelRegistry, timeout: float) -> ReloadReport:
        """Rescan here and have every other worker rescan; answers once all of them have
        (or `timeout` s have passed), with this worker's report."""
        target = self.state.request_reload(self.index)
        self._claimed = max(self._claimed, target)
        report = await registry.reload()
        self._row[RELOADED] = max(int(self._row[RELOADED]), target)
        await self._wait_reloaded(target, timeout)
        return report

    async def _wait_reloaded(self, target: int, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            behind = [i for i in range(self.workers)
                      if self.state.pid(i) and self.state.rows[i, STATE] != STOPPING
                      and self.state.rows[i, RELOADED] < target]
            if not behind:
                return
            await asyncio.sleep(TICK_SECONDS / 2)
        logger.warning("reload: workers %s had not finished rescanning after %g s", behind,
                       timeout)


async def reload_logged(registry: ModelRegistry) -> None:
    """Rescan, logging (not raising) what goes wrong: for rescans nobody waits on."""
    try:
        await registry.reload()
    except ShuttingDownError:
        logger.info("rescan skipped: shutting down")
    except CheckpointFolderError as exc:
        logger.error("%s", exc)
    except Exception:  # noqa: BLE001 - a failed rescan must not stop the worker
        logger.exception("reload failed")


def workers_for(requested: int, *, on_cuda: bool, cpus: int | None = None) -> int:
    """The worker count for `--workers` (0: automatic).

    Automatic: one on the CPU, where the model needs every core and a second process would
    only split them; on CUDA one per four cores (each worker's decode threads keep about
    that many busy), at least one and at most 16.
    """
    if requested:
        return requested
    if not on_cuda:
        return 1
    cpus = cpus or available_cpus()
    return max(1, min(16, math.floor(cpus / 4)))
