"""Giving a retired model's memory back to the operating system, not only to the allocator.

A model's tensors are freed when its last reference goes, but a model is a web of cycles
(modules, hooks, closures) that waits for the cyclic collector, and the C allocator keeps
freed pages for reuse: without both steps each model ever loaded would keep its share of
the process's resident memory for good.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from typing import Any

logger = logging.getLogger(__name__)


def _release_function() -> tuple[str, Any] | None:
    """The allocator's own "give free pages back" call: tcmalloc's when it is loaded,
    else glibc's malloc_trim; None on other C libraries."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    for name in ("MallocExtension_ReleaseFreeMemory", "malloc_trim"):
        function = getattr(process, name, None)
        if function is not None:
            return name, function
    return None


def release_memory() -> None:
    """Collect unreachable objects, then hand the allocator's free pages back to the OS.

    Blocking (tens of milliseconds): call it off the event loop, after a model has retired.
    """
    collected = gc.collect()
    found = _release_function()
    if found is None:
        logger.debug("memory: %d objects collected; no allocator call to release pages",
                     collected)
        return
    name, function = found
    if name == "malloc_trim":
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
        function(0)
    else:
        function.argtypes, function.restype = [], None
        function()
    logger.debug("memory: %d objects collected, free pages released (%s)", collected, name)
