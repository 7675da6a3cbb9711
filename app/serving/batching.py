"""DynamicBatcher: images from many requests share model batches.

Callers `submit` a request's items (images) and await one output per item. A single worker
task takes up to `max_batch_size` items from a bounded queue (a large request spans batches),
waits at most `max_wait_ms` for more when more are expected, runs the batch function on a
compute thread (shared by every model's batcher in the service) and hands each caller its
outputs. Items whose caller has gone (deadline
passed, request cancelled) are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.exceptions import (
    BatcherClosedError,
    BatchFailedError,
    BatchOutOfMemoryError,
    DeadlineExceededError,
    QueueFullError,
)
from app.serving.compute import ComputeThread
from app.serving.queue_bound import LocalQueueBound, QueueBound
from models.device import is_out_of_memory

logger = logging.getLogger(__name__)

BatchFn = Callable[[list[Any]], Sequence[Any]]
EventHook = Callable[[str, int], None]


@dataclass(eq=False)
class _Request:
    items: list[Any]
    future: asyncio.Future
    deadline: float
    dispatched: int = 0  # items handed to a batch so far
    outputs: list[Any] = field(default_factory=list)
    queued: bool = True

    @property
    def size(self) -> int:
        return len(self.items)


BatchPart = tuple[_Request, int, int]  # a request's items [start, end) in one batch


@dataclass
class BatcherStats:
    """Counters a batcher keeps (images, not requests, unless said otherwise)."""

    batches: int = 0
    images: int = 0
    failed_batches: int = 0
    rejected: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)  # by reason: expired/disconnected/failed


class DynamicBatcher:
    """One worker that groups queued items into batches for a batch function."""

    def __init__(self, fn: BatchFn, *, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, name: str = "model", on_event: EventHook | None = None,
                 compute: ComputeThread | None = None,
                 bound: QueueBound | None = None) -> None:
        if not callable(fn):
            raise TypeError("fn must be callable")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not (isinstance(max_wait_ms, (int, float)) and 0 <= max_wait_ms < math.inf):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        if not isinstance(max_queue, int) or max_queue < max_batch_size:
            raise ValueError(f"max_queue ({max_queue!r}) must be an int >= max_batch_size "
                             f"({max_batch_size})")
        self.fn = fn
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        # the room of `max_queue` images: this batcher's own, or shared by every worker
        self._bound = bound if bound is not None else LocalQueueBound(max_queue)
        self.stats = BatcherStats()
        self._on_event = on_event
        self._queue: deque[_Request] = deque()
        self._queued = 0  # items waiting in the queue
        self._incoming = 0  # items reserved (being decoded), not yet submitted
        self._last_callers = 0  # requests in the previous batch
        self._batch_seconds = 0.0  # moving average of a batch's run time
        self._current: list[BatchPart] = []
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._compute = compute  # shared: not ours to close
        self._own_compute: ComputeThread | None = None

    @property
    def queued(self) -> int:
        """Items waiting in the queue."""
        return self._queued

    @property
    def running(self) -> bool:
        """True between `start` and the end of `stop`."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the worker task (call from the event loop); without a shared compute thread,
        the batcher starts its own."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        if self._compute is None:
            self._compute = self._own_compute = ComputeThread(f"batch-{self.name}")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"batcher-{self.name}")

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Reserve queue room for `count` items being prepared (the worker may wait for them).

        Raises QueueFullError at once when the room is taken: items still being decoded count
        against `max_queue` too, so an overload is refused before any work is spent on it.
        """
        if not self._bound.try_add(count):
            self._refuse(count)
        self._incoming += count
        try:
            yield
        finally:
            self._incoming -= count
            self._bound.remove(count)

    async def submit(self, items: Sequence[Any], *, timeout: float) -> list[Any]:
        """Queue `items` and return one output per item, in order.

        Raises QueueFullError at once when they do not fit, DeadlineExceededError when
        `timeout` seconds pass first, BatchFailedError when their batch failed.
        """
        if self._closing or self._task is None:
            raise BatcherClosedError(f"model {self.name!r} is not taking new work")
        if not items:
            return []
        if not self._bound.try_add(len(items)):
            self._refuse(len(items))
        loop = asyncio.get_running_loop()
        request = _Request(list(items), loop.create_future(), loop.time() + timeout)
        self._queue.append(request)
        self._queued += request.size
        self._arrived.set()
        try:
            return await asyncio.wait_for(request.future, timeout)
        except TimeoutError:
            self._drop(request, "expired")
            raise DeadlineExceededError(
                f"no result within the request timeout ({timeout:.2f} s left)") from None
        except asyncio.CancelledError:
            self._drop(request, "disconnected")
            raise

    def _refuse(self, count: int) -> None:
        self.stats.rejected += count
        self._emit("rejected", count)
        raise QueueFullError(requested=count, queued=self._bound.held(),
                             capacity=self.max_queue, retry_after=self.retry_after())

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely drained (at least 1)."""
        batches = math.ceil((self._queued + self._incoming + 1) / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_seconds))

    async def stop(self, timeout: float = 30.0) -> None:
        """Take no new work, finish what is queued (up to `timeout` s), then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                logger.warning("batcher %s: %d images still queued after %g s; stopping",
                               self.name, self._queued, timeout)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        closed = BatcherClosedError(f"model {self.name!r} stopped")
        self._fail(self._current, closed, reason="failed")
        self._fail([(r, r.dispatched, r.size) for r in list(self._queue)], closed, reason="failed")
        if self._own_compute is not None:
            self._own_compute.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        compute = self._compute
        if compute is None:
            raise RuntimeError("batcher worker started without start()")
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            self._current = await self._collect(loop)
            if not self._current:
                continue
            items = [item for req, start, end in self._current for item in req.items[start:end]]
            began = time.perf_counter()
            try:
                outputs = await compute.run(self.fn, items)
                if len(outputs) != len(items):
                    raise BatchFailedError(
                        f"batch function returned {len(outputs)} outputs for {len(items)} inputs")
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the worker
                logger.exception("batch of %d images on %s failed", len(items), self.name)
                self.stats.failed_batches += 1
                self._fail(self._current, exc, reason="failed")
            else:
                self._deliver(self._current, outputs)
            self._record(len(items), len({id(s[0]) for s in self._current}),
                         time.perf_counter() - began)
            self._current = []

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[BatchPart]:
        """Take a batch; linger up to max_wait for more only when more are expected."""
        batch = self._take(self.max_batch_size, loop.time())
        size = sum(end - start for _, start, end in batch)
        give_up = loop.time() + self.max_wait
        while size < self.max_batch_size and self._expect_more():
            remaining = give_up - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
            more = self._take(self.max_batch_size - size, loop.time())
            batch.extend(more)
            size += sum(end - start for _, start, end in more)
        return batch

    def _expect_more(self) -> bool:
        # Waiting only pays when company is likely: images are being decoded right now, or
        # the last batch served several callers (concurrent traffic). A lone caller never waits.
        return not self._closing and (self._incoming > 0 or self._last_callers > 1)

    def _take(self, limit: int, now: float) -> list[BatchPart]:
        batch: list[BatchPart] = []
        while self._queue and limit > 0:
            request = self._queue[0]
            if request.future.done() or request.deadline <= now:
                self._fail([(request, request.dispatched, request.size)],
                           DeadlineExceededError("deadline passed while queued"),
                           reason="expired")
                continue
            count = min(limit, request.size - request.dispatched)
            batch.append((request, request.dispatched, request.dispatched + count))
            request.dispatched += count
            self._queued -= count
            self._bound.remove(count)
            limit -= count
            if request.dispatched == request.size:
                self._queue.popleft()
                request.queued = False
        return batch

    def _deliver(self, batch: list[BatchPart], outputs: Sequence[Any]) -> None:
        offset = 0
        for request, start, end in batch:
            part = outputs[offset:offset + end - start]
            offset += end - start
            if request.future.done():
                continue
            request.outputs.extend(part)
            if len(request.outputs) == request.size:
                request.future.set_result(request.outputs)

    def _fail(self, batch: list[BatchPart], exc: BaseException, *, reason: str) -> None:
        for request, _, _ in batch:
            self._drop(request, reason)
            if not request.future.done():
                if isinstance(exc, MemoryError) or is_out_of_memory(exc):
                    wrapped = BatchOutOfMemoryError("out of memory while running the batch; "
                                                    "retry later or send fewer images")
                    wrapped.__cause__ = exc
                    exc = wrapped
                elif not isinstance(exc, (BatcherClosedError, DeadlineExceededError,
                                          BatchFailedError)):
                    wrapped = BatchFailedError(f"inference failed: {type(exc).__name__}")
                    wrapped.__cause__ = exc
                    exc = wrapped
                request.future.set_exception(exc)

    def _drop(self, request: _Request, reason: str) -> None:
        """Remove a request's not-yet-run items from the queue, counting them."""
        if not request.queued:
            return
        request.queued = False
        with contextlib.suppress(ValueError):
            self._queue.remove(request)
        dropped = request.size - request.dispatched
        self._queued -= dropped
        self._bound.remove(dropped)
        request.dispatched = request.size
        if dropped:
            self.stats.dropped[reason] += dropped
            self._emit(reason, dropped)

    def _record(self, size: int, callers: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.images += size
        self.stats.batch_sizes[size] += 1
        self._last_callers = callers
        # an exponential moving average: Retry-After follows the recent batch time without
        # jumping with one slow or fast batch (each new batch weighs a fifth)
        self._batch_seconds = seconds if not self._batch_seconds else (
            0.8 * self._batch_seconds + 0.2 * seconds)
        self._emit("batch", size)

    def _emit(self, event: str, count: int) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event, count)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("batcher event hook failed")
