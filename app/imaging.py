"""Decoding and resizing uploads on a bounded, fair thread pool, off the event loop.

Where a model's device decodes JPEGs (models.device_decode), a request's JPEGs go there first,
in one call on a thread of its own, and only what it hands back joins the pool with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.batching import DeadlineExceededError
from app.compute import name_native_thread
from app.exceptions import InsufficientMemoryError, InvalidImageError, OversizedImageError
from models import decoding
from models.device_decode import CpuFallback, DeviceJpegDecoder, DeviceResult, is_jpeg
from models.preprocessing import Transform

logger = logging.getLogger(__name__)


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
    work: Callable[[], torch.Tensor]
    future: asyncio.Future


@dataclass(eq=False)
class _Request:
    """One request's decode jobs: those waiting, and how many threads it holds now."""

    jobs: deque[_Job]
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    running: int = 0


class ImageDecoder:
    """Turns uploads into uint8 CHW tensors with a model's eval transform, on worker threads.

    Scheduling is fair across requests: a free thread takes the next image of the request
    holding the fewest threads, and no request holds more than `share` of them, so one request
    of huge images cannot starve the small ones arriving after it. Images of a request whose
    deadline has passed, or that has failed or gone, are never started.
    """

    def __init__(self, *, workers: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.share = max(1, workers - 1)  # leave a thread for the next request to arrive
        self._requests: list[_Request] = []
        self._lock = threading.Condition()
        self._closed = False
        self._device_thread: ThreadPoolExecutor | None = None  # started when first needed
        self._threads = [threading.Thread(target=self._serve, name=f"decode_{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def decode(self, uploads: list[Upload], transform: Transform, *,
                     target_size: int | None = None, timeout: float,
                     on_device: DeviceJpegDecoder | None = None) -> list[DecodedImage]:
        """Decode one request's uploads within `timeout` s; the first bad file (in upload
        order) raises, and DeadlineExceededError when the time runs out first. With
        `on_device`, the JPEGs it can decode come from it, the rest from the threads."""
        if on_device is None:
            return await self._decode_on_threads(uploads, transform, target_size, timeout)
        give_up = time.monotonic() + timeout
        done = await self._decode_on_device(uploads, on_device, timeout)
        rest = [upload for index, upload in enumerate(uploads) if index not in done]
        decoded = iter(await self._decode_on_threads(
            rest, transform, target_size, give_up - time.monotonic()) if rest else [])
        return [DecodedImage(upload.filename, done[index]) if index in done else next(decoded)
                for index, upload in enumerate(uploads)]

    async def _decode_on_device(self, uploads: list[Upload], device: DeviceJpegDecoder,
                                timeout: float) -> dict[int, torch.Tensor]:
        """The crops of the JPEGs `device` decodes, by upload index (it never raises for a
        bad file: those come back for the threads, which report them)."""
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
            raise DeadlineExceededError(
                f"decoding {len(uploads)} image(s) did not finish within the request "
                f"timeout ({timeout:.2f} s)") from None
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

    async def _decode_on_threads(self, uploads: list[Upload], transform: Transform,
                                 target_size: int | None, timeout: float
                                 ) -> list[DecodedImage]:
        """Decode uploads on the pool, fairly across requests, within `timeout` s."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(i, self._work(u, transform, target_size), loop.create_future())
                for i, u in enumerate(uploads)]
        request = _Request(deque(jobs), time.monotonic() + timeout, loop)
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._requests.append(request)
            self._lock.notify_all()
        try:
            return await asyncio.wait_for(self._results(request, jobs, uploads), timeout)
        except TimeoutError:
            raise DeadlineExceededError(
                f"decoding {len(uploads)} image(s) did not finish within the request "
                f"timeout ({timeout:.2f} s)") from None
        finally:
            self._withdraw(request)
            for job in jobs:  # outcomes nobody will read: cancel, or mark as seen
                if not job.future.cancel() and not job.future.cancelled():
                    job.future.exception()

    async def _results(self, request: _Request, jobs: list[_Job],
                       uploads: list[Upload]) -> list[DecodedImage]:
        results = []
        # in upload order, so that the first bad file is the one reported
        for job, upload in zip(jobs, uploads, strict=True):
            try:
                results.append(DecodedImage(upload.filename, await job.future))
            except Exception:
                self._withdraw(request)  # nothing after a bad file needs decoding
                raise
        return results

    def _work(self, upload: Upload, transform: Transform,
              target_size: int | None) -> Callable[[], torch.Tensor]:
        return lambda: self._convert(upload, transform, target_size)

    def _convert(self, upload: Upload, transform: Transform,
                 target_size: int | None) -> torch.Tensor:
        try:
            image = decoding.decode(upload.data, max_pixels=self.max_pixels,
                                         target_size=target_size)
            return transform(image)
        except decoding.ImageTooLargeError as exc:
            raise OversizedImageError(upload.filename, str(exc)) from None
        except decoding.ImageDecodeError as exc:
            raise InvalidImageError(upload.filename, str(exc)) from None
        except MemoryError:
            raise InsufficientMemoryError(
                upload.filename, "not enough memory to decode this image now") from None
        except (ValueError, RuntimeError, OSError) as exc:
            raise InvalidImageError(upload.filename, f"cannot be transformed: {exc}") from None

    def _withdraw(self, request: _Request) -> None:
        with self._lock:
            request.jobs.clear()
            if request in self._requests:
                self._requests.remove(request)

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

    def _serve(self) -> None:
        name_native_thread("decode")
        while True:
            with self._lock:
                taken = self._next_job()
                while taken is None:
                    if self._closed:
                        return
                    self._lock.wait()
                    taken = self._next_job()
            request, job = taken
            outcome: torch.Tensor | BaseException
            try:
                outcome = job.work()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                outcome = exc
            with self._lock:
                request.running -= 1
                self._lock.notify_all()  # the request may be under its share again
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                request.loop.call_soon_threadsafe(_settle, job.future, outcome)

    def close(self) -> None:
        """Stop the worker threads after the images they are decoding (the rest is dropped)."""
        with self._lock:
            self._closed = True
            self._requests.clear()
            self._lock.notify_all()
            if self._device_thread is not None:
                self._device_thread.shutdown(wait=False, cancel_futures=True)


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
        except Exception as exc:  # noqa: BLE001 - the threads can still decode them
            logger.warning("device decode of %d JPEGs failed, decoding them on the threads: "
                           "%s", len(self.images), exc)
            return [CpuFallback("device failed")] * len(self.images)


def _settle(future: asyncio.Future, outcome: torch.Tensor | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
