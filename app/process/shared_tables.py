"""What the server's worker processes share: readiness, heartbeats, reloads and queue room.

With `--workers N` the supervisor (app.process.supervisor) creates these tables in shared memory
before it spawns the workers, and each worker sees them through a `WorkerLink`. Every cell
has one writer (a worker writes its own row, the supervisor clears a dead worker's row), so
no lock is needed and a worker that dies mid-write can never wedge the others.

A worker counts as ready only while its heartbeat is fresh (`stale_after` seconds, well under
`worker_timeout`): a stopped or stalled worker still holds its share of the port's new
connections, so `/ready` turns 503 long before the supervisor replaces it.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import SynchronizedBase
from typing import Any

import numpy as np

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
