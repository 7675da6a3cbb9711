"""Which threads run torch: one compute thread for every batch, loading on short-lived threads.

torch's CPU kernels run on OpenMP (libgomp). libgomp keeps a team of worker threads for each
thread that ever ran a parallel op, and while the process holds more OpenMP threads than CPUs
the workers stop spinning between parallel regions and sleep instead: every one of the hundred
or so small ops of a ResNet forward pass then waits for a wake-up, a cost measured by
`python -m bench.threads` (docs/benchmarks.md).

So the service keeps torch's parallel work on as few living threads as it can:

- every model's batches run on one shared compute thread (`ComputeThread`); batches of two
  models could not run faster side by side anyway, since each uses every core;
- loading and warming up a checkpoint runs on a fresh thread that exits when done
  (`run_in_fresh_thread`), so its OpenMP team goes with it, while the models already loaded
  keep serving;
- the event loop and the decode pool run no parallel torch op (post-processing works on one
  image's scores at a time).

The threads carry their role as their OS name (`compute`, `decode`, `load-<model>`), and
threads they start inherit it, torch's OpenMP workers included: `top -H`, `py-spy` and the
benchmark's per-thread CPU accounting show which role the CPU time went to.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


_OS_NAME_MAX = 15  # Linux keeps 15 bytes of a thread's name


def name_native_thread(name: str) -> bool:
    """Give the calling thread `name` as its OS-level name (Linux; elsewhere a no-op).

    Python names its threads only for itself; the OS sees every thread as "python". Threads
    started afterwards by this one (OpenMP workers among them) inherit the name. Returns True
    when the name was set.
    """
    setname = _pthread_setname()
    if setname is None:
        return False
    self_id, set_name = setname
    return set_name(self_id(), name.encode("ascii", "replace")[:_OS_NAME_MAX]) == 0


@functools.cache
def _pthread_setname() -> tuple[Callable[[], int], Callable[[int, bytes], int]] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self_id, set_name = libc.pthread_self, libc.pthread_setname_np
    except (OSError, AttributeError):
        return None
    self_id.argtypes, self_id.restype = [], ctypes.c_ulong
    set_name.argtypes, set_name.restype = [ctypes.c_ulong, ctypes.c_char_p], ctypes.c_int
    return self_id, set_name


class ComputeThread:
    """One thread that runs every model's batches, in the order they are submitted."""

    def __init__(self, name: str = "compute") -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name,
                                            initializer=name_native_thread, initargs=(name,))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the compute thread and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        """Stop taking work; work already running finishes, queued work is cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)


async def run_in_fresh_thread(fn: Callable[..., T], *args: Any, name: str = "load") -> T:
    """Run `fn(*args)` on a new thread that exits afterwards, and return its result.

    Cancelling the caller does not stop `fn`; its result is then dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        name_native_thread(name)
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            _call_soon(loop, settle, None, exc)
        else:
            _call_soon(loop, settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed while the thread ran
        logger.debug("event loop closed before a background thread finished")
