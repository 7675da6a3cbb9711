"""A few processes that parse large request bodies, so that parsing never stalls the event loop.

Turning megabytes of JSON into Python objects holds the GIL for the whole call (a 20 MB
nested body: 1.4 s in one call), so on a thread it still stalls the event loop and every
route with it, /health included. Bodies past `inline_below` bytes are parsed in one of a few
spawned processes (nothing of the server is copied into them; they import only the parser's
module); smaller ones are parsed at once where they arrived, since a round trip to a process
costs more than they do. The processes leave with the server: on close, and on their own when
the server process dies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from app.exceptions import ParserUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
INLINE_BELOW = 64 * 1024  # bytes of JSON parse and convert in about 2 ms at worst
PARSER_NICENESS = 5  # under contention the event loop and the model come first


class ParserPool:
    """`processes` spawned parser processes, started on first use and replaced if one dies."""

    def __init__(self, processes: int, *, inline_below: int = INLINE_BELOW) -> None:
        if processes < 1:
            raise ValueError(f"a parser pool needs at least one process, got {processes}")
        self.processes = processes
        self.inline_below = inline_below
        self._executor: ProcessPoolExecutor | None = None
        self._closed = False

    async def run(self, parse: Callable[..., T], /, *args: Any, size: int,
                  **kwargs: Any) -> T:
        """`parse(*args, **kwargs)`: at once when `size` (the bytes it reads) is small, else
        in a parser process. Its own exceptions reach the caller as they were raised."""
        if size < self.inline_below:
            return parse(*args, **kwargs)
        executor = self._pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(parse, *args, **kwargs))
        except BrokenProcessPool:
            self._replace(executor)
            raise ParserUnavailableError("the process parsing this request stopped; try "
                                         "again") from None

    def close(self) -> None:
        """Stop the processes now; work still queued is cancelled."""
        self._closed = True
        if self._executor is not None:
            _stop(self._executor)
            self._executor = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise ParserUnavailableError("the service is shutting down")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_parser)
        return self._executor

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:
            logger.warning("a parser process died; starting new ones")
            _stop(broken)
            self._executor = None


def _stop(executor: ProcessPoolExecutor) -> None:
    """Shut the executor down without waiting for its current work, and end its processes."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:  # a parse is bounded, but shutting down waits for nobody
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def _start_parser() -> None:
    """In each parser process: yield the CPU to the server's own threads, leave Ctrl-C to
    the server, and exit when the server does."""
    os.nice(PARSER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                         name="parent-watch").start()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the server process has gone, however it went
    os._exit(0)
