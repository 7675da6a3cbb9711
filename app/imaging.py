"""Decoding and resizing uploads on a bounded, fair thread pool, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.batching import DeadlineExceededError
from app.compute import name_native_thread
from app.exceptions import InsufficientMemoryError, InvalidImageError, OversizedImageError
from models import decoding
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
        self._threads = [threading.Thread(target=self._serve, name=f"decode_{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    async def decode(self, uploads: list[Upload], transform: Transform, *,
                     target_size: int | None = None, timeout: float) -> list[DecodedImage]:
        """Decode one request's uploads within `timeout` s; the first bad file (in upload
        order) raises, and DeadlineExceededError when the time runs out first."""
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


def _settle(future: asyncio.Future, outcome: torch.Tensor | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
