"""Bounds the operating system puts on a process that decodes untrusted images.

Shared by the server's decode processes (app.serving.decode_box) and training's DataLoader workers:
an address-space cap over what the process maps when it starts, and a per-image time budget
for code that runs in a process's main thread.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from models.decoding import ImageDecodeError


class DecodeTimeoutError(ImageDecodeError):
    """Decoding one image took longer than its time budget."""


def limit_address_space(extra_bytes: int) -> int:
    """Cap this process's address space at what it maps now plus `extra_bytes`; returns the
    cap. An allocation past it fails (MemoryError in Python) instead of taking the host's
    memory."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


def mapped_bytes() -> int:
    """This process's address space now (VmSize)."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmSize not found in /proc/self/status")


@contextlib.contextmanager
def time_budget(seconds: float, what: str = "decoding") -> Iterator[None]:
    """Raise DecodeTimeoutError inside the block once it has run `seconds` (wall clock).

    A signal timer: it works only in a process's main thread (elsewhere the block runs
    unbounded), and C code is interrupted when it next returns to Python (Pillow feeds its
    decoders in chunks, so that is soon).
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise DecodeTimeoutError(f"{what} took longer than its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
