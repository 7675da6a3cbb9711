"""A worker's link to the others: it publishes its heartbeat and state in the shared tables,
answers for all of them, and carries out the reloads any of them (or SIGHUP) asks for."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from app.metrics import Metrics
from app.process.shared_tables import (
    HEARTBEAT_NS,
    PID,
    READY,
    RELOADED,
    STARTING,
    STATE,
    STOPPING,
    TICK_SECONDS,
    ClusterTables,
    SharedQueueBound,
    SharedState,
)
from app.serving.registry import ModelRegistry, ReloadReport, reload_logged

logger = logging.getLogger(__name__)


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
