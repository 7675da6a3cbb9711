"""Decoding and resizing uploads in bounded processes, scheduled fairly, off the event loop.

Each decode thread feeds one decode process (app.serving.decode_box) that the operating system
bounds in memory and that is killed when its image's request has its answer (deadline,
failure, withdrawal): the thread only hands bytes over and waits.

Where a model's device decodes JPEGs (models.device_decode), a request's JPEGs go there first,
in one call on a thread of its own, and only what it hands back joins the processes' queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from app.exceptions import (
    DeadlineExceededError,
    InsufficientMemoryError,
    InvalidImageError,
    OversizedImageError,
)
from app.serving.compute import name_native_thread
from app.serving.decode_box import (
    BoxLimits,
    DecodeOverMemoryError,
    DecodeProcess,
    DecodeRecipe,
    DecodeStoppedError,
    drain,
)
from models import decoding
from models.device_decode import CpuFallback, DeviceJpegDecoder, DeviceResult, is_jpeg

logger = logging.getLogger(__name__)

DEFAULT_LIMITS = BoxLimits(memory_bytes=512 << 20, cpu_seconds=60.0)


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class DecodedImage:
    """An upload after decoding: its filename and the uint8 CHW crop the model will see."""

    filename: str
    pixels: torch.Tensor


@dataclass(eq=False)
class _Job:
    index: int
    upload: Upload
    recipe: DecodeRecipe
    future: asyncio.Future


@dataclass(eq=False)
class _Request:
    """One request's decode jobs: those waiting, and how many threads it holds now."""

    jobs: deque[_Job]
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    running: int = 0


@dataclass(eq=False)
class _Slot:
    """A decode thread's process, the pipe that stops its decode, and whose image it runs."""

    process: DecodeProcess
    cancel_read: int
    cancel_write: int
    request: _Request | None = field(default=None)
    job: _Job | None = field(default=None)
    started: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(cls, limits: BoxLimits) -> _Slot:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        return cls(DecodeProcess(limits), read, write)

    def stop(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.cancel_write, b"x")

    def close(self) -> None:
        self.process.close()
        os.close(self.cancel_read)
        os.close(self.cancel_write)


class ImageDecoder:
    """Turns uploads into uint8 CHW crops with a model's `DecodeRecipe`, in decode processes.

    Scheduling is fair across requests: a free thread takes the next image of the request
    holding the fewest threads, and no request holds more than `share` of them, so one request
    of huge images cannot starve the small ones arriving after it. Images of a request whose
    deadline has passed, or that has failed or gone, are never started, and those running
    are stopped (their processes killed and replaced).
    """

    def __init__(self, *, workers: int, max_pixels: int,
                 limits: BoxLimits = DEFAULT_LIMITS) -> None:
        self.workers = workers
        self.max_pixels = max_pixels
        self.limits = limits
        self.share = max(1, workers - 1)  # leave a thread for the next request to arrive
        self._requests: list[_Request] = []
        self._lock = threading.Condition()
        self._closed = False
        self._device_thread: ThreadPoolExecutor | None = None  # started when first needed
        self._slots = [_Slot.open(limits) for _ in range(workers)]
        self._threads = [threading.Thread(target=self._serve, args=(slot,), name=f"decode_{i}",
                                          daemon=True)
                         for i, slot in enumerate(self._slots)]
        for thread in self._threads:
            thread.start()

    def wait_started(self, timeout: float) -> bool:
        """Wait (blocking, bounded) until every decode process has started once, so that the
        first requests never wait for one; False when `timeout` s passed first."""
        give_up = time.monotonic() + timeout
        return all(slot.started.wait(max(0.0, give_up - time.monotonic()))
                   for slot in self._slots)

    def process_ids(self) -> list[int]:
        """The decode processes running now (for tests and diagnostics)."""
        return [pid for slot in self._slots if (pid := slot.process.pid) is not None]

    async def decode(self, uploads: list[Upload], recipe: DecodeRecipe, *, timeout: float,
                     on_device: DeviceJpegDecoder | None = None) -> list[DecodedImage]:
        """Decode one request's uploads within `timeout` s; the first bad file (in upload
        order) raises, and DeadlineExceededError when the time runs out first. With
        `on_device`, the JPEGs it can decode come from it, the rest from the processes."""
        if on_device is None:
            return await self._decode_in_processes(uploads, recipe, timeout)
        give_up = time.monotonic() + timeout
        done = await self._decode_on_device(uploads, on_device, timeout)
        rest = [upload for index, upload in enumerate(uploads) if index not in done]
        decoded = iter(await self._decode_in_processes(
            rest, recipe, give_up - time.monotonic()) if rest else [])
        return [DecodedImage(upload.filename, done[index]) if index in done else next(decoded)
                for index, upload in enumerate(uploads)]

    async def _decode_on_device(self, uploads: list[Upload], device: DeviceJpegDecoder,
                                timeout: float) -> dict[int, torch.Tensor]:
        """The crops of the JPEGs `device` decodes, by upload index (it never raises for a
        bad file: those come back for the processes, which report them)."""
        indices = [index for index, upload in enumerate(uploads) if is_jpeg(upload.data)]
        if not indices:
            return {}
        loop = asyncio.get_running_loop()
        work = _DeviceBatch(device, [uploads[i].data for i in indices],
                            time.monotonic() + timeout)
        try:
            results = await asyncio.wait_for(
                loop.run_in_executor(self._device_executor(), work), timeout)
        except TimeoutError:
            raise _deadline(len(uploads), timeout) from None
        return {index: result for index, result in zip(indices, results, strict=True)
                if isinstance(result, torch.Tensor)}

    def _device_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            if self._device_thread is None:
                self._device_thread = ThreadPoolExecutor(
                    1, thread_name_prefix="device_decode", initializer=name_native_thread,
                    initargs=("device_decode",))
            return self._device_thread

    async def _decode_in_processes(self, uploads: list[Upload], recipe: DecodeRecipe,
                                   timeout: float) -> list[DecodedImage]:
        """Decode uploads in the processes, fairly across requests, within `timeout` s."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(i, upload, recipe, loop.create_future())
                for i, upload in enumerate(uploads)]
        request = _Request(deque(jobs), time.monotonic() + timeout, loop)
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._requests.append(request)
            self._lock.notify_all()
        try:
            return await asyncio.wait_for(self._results(request, jobs), timeout)
        except TimeoutError:
            raise _deadline(len(uploads), timeout) from None
        finally:
            self._withdraw(request)
            for job in jobs:  # outcomes nobody will read: cancel, or mark as seen
                if not job.future.cancel() and not job.future.cancelled():
                    job.future.exception()

    async def _results(self, request: _Request, jobs: list[_Job]) -> list[DecodedImage]:
        results = []
        # in upload order, so that the first bad file is the one reported
        for job in jobs:
            try:
                results.append(DecodedImage(job.upload.filename, await job.future))
            except Exception:
                self._withdraw(request)  # nothing after a bad file needs decoding
                raise
        return results

    def _convert(self, slot: _Slot, request: _Request, job: _Job) -> torch.Tensor:
        """One upload decoded in `slot`'s process, its failures as the service's errors."""
        name = job.upload.filename
        try:
            pixels = slot.process.run(job.recipe, job.upload.data, self.max_pixels,
                                      deadline=request.deadline, cancel_fd=slot.cancel_read)
            return torch.from_numpy(pixels).permute(2, 0, 1)
        except (DecodeOverMemoryError, decoding.ImageTooLargeError) as exc:
            raise OversizedImageError(name, str(exc)) from None
        except decoding.ImageDecodeError as exc:  # a crash of the decoder included
            raise InvalidImageError(name, str(exc)) from None
        except DecodeStoppedError as exc:  # nobody is waiting for it any more
            raise DeadlineExceededError(f"decoding {name!r} was stopped: {exc}") from None
        except (MemoryError, OSError) as exc:  # the server's own memory or processes
            logger.warning("could not decode %r in a decode process: %s", name, exc)
            raise InsufficientMemoryError(
                name, "not enough memory to decode this image now") from None

    def _withdraw(self, request: _Request) -> None:
        """Start nothing more of `request`, and stop what of it is being decoded."""
        with self._lock:
            request.jobs.clear()
            if request in self._requests:
                self._requests.remove(request)
            for slot in self._slots:
                if slot.request is request:
                    slot.stop()

    def _drop_after(self, request: _Request, index: int) -> None:
        """After upload `index` failed, nothing after it in upload order can be the answer:
        start none of it, and stop what of it runs (call holding the lock)."""
        request.jobs = deque(job for job in request.jobs if job.index < index)
        for slot in self._slots:
            if slot.request is request and slot.job is not None and slot.job.index > index:
                slot.stop()

    def _next_job(self) -> tuple[_Request, _Job] | None:
        """The next image to decode (call holding the lock)."""
        now = time.monotonic()
        for request in [r for r in self._requests if r.deadline <= now]:
            self._requests.remove(request)  # its caller gets 504; start none of it
        waiting = [r for r in self._requests if r.jobs and r.running < self.share]
        if not waiting:
            return None
        request = min(waiting, key=lambda r: r.running)  # min() keeps arrival order on ties
        job = request.jobs.popleft()
        if not request.jobs:
            self._requests.remove(request)
        request.running += 1
        return request, job

    def _serve(self, slot: _Slot) -> None:
        name_native_thread("decode")
        try:
            slot.process.start()
        except OSError as exc:  # started again at its first image
            logger.warning("could not start a decode process yet: %s", exc)
        slot.started.set()
        try:
            while (taken := self._take(slot)) is not None:
                request, job = taken
                outcome: torch.Tensor | BaseException
                try:
                    outcome = self._convert(slot, request, job)
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                    outcome = exc
                with self._lock:
                    slot.request = slot.job = None
                    request.running -= 1
                    if isinstance(outcome, Exception):
                        self._drop_after(request, job.index)
                    self._lock.notify_all()  # the request may be under its share again
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                    request.loop.call_soon_threadsafe(_settle, job.future, outcome)
        finally:
            slot.close()

    def _take(self, slot: _Slot) -> tuple[_Request, _Job] | None:
        """The next job for `slot`, waiting for one (None once the decoder is closed)."""
        with self._lock:
            while not self._closed and (taken := self._next_job()) is None:
                self._lock.wait()
            if self._closed:
                return None
            slot.request, slot.job = taken
            drain(slot.cancel_read)  # a stop meant for its previous image
            return taken

    def close(self) -> None:
        """Stop the decode threads and processes (what is being decoded is stopped too)."""
        with self._lock:
            self._closed = True
            self._requests.clear()
            for slot in self._slots:
                slot.stop()
            self._lock.notify_all()
            if self._device_thread is not None:
                self._device_thread.shutdown(wait=False, cancel_futures=True)


def _deadline(images: int, timeout: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"decoding {images} image(s) did not finish within the request timeout "
        f"({timeout:.2f} s)")


@dataclass(frozen=True)
class _DeviceBatch:
    """One request's JPEGs for the device thread; all handed back when the request's time has
    passed before they start, or when the device fails as a whole."""

    device: DeviceJpegDecoder
    images: list[bytes]
    give_up: float  # time.monotonic()

    def __call__(self) -> list[DeviceResult]:
        if time.monotonic() >= self.give_up:
            return [CpuFallback("deadline passed")] * len(self.images)
        try:
            return self.device.decode(self.images)
        except Exception as exc:  # noqa: BLE001 - the processes can still decode them
            logger.warning("device decode of %d JPEGs failed, decoding them in the decode "
                           "processes: %s", len(self.images), exc)
            return [CpuFallback("device failed")] * len(self.images)


def _settle(future: asyncio.Future, outcome: torch.Tensor | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
