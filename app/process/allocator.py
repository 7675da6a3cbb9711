"""Start the server on tcmalloc when it is installed.

glibc's malloc returns the large activation buffers of every forward pass to the kernel and
maps them again on the next one (hundreds of thousands of page faults per minute on a CPU);
tcmalloc keeps them. The only way to swap the allocator is before the process starts, so the
launcher re-executes itself once with LD_PRELOAD set.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_REEXEC_MARKER = "RESNET_SERVE_ALLOCATOR_REEXEC"
_CANDIDATES = ("tcmalloc_minimal", "tcmalloc")
_FAST = ("tcmalloc", "jemalloc", "mimalloc")


def loaded_allocator() -> str:
    """The malloc this process runs on: tcmalloc/jemalloc/mimalloc when preloaded, else glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return next((name for name in _FAST if name in maps), "glibc")


def find_tcmalloc() -> str | None:
    """The soname of an installed tcmalloc, or None."""
    for name in _CANDIDATES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def reexec_with_fast_allocator(choice: str, argv: Sequence[str],
                               environ: Mapping[str, str]) -> None:
    """Replace this process by itself with tcmalloc preloaded, when that is possible and asked.

    Returns (without exec) when `choice` is "system", when a fast allocator is already loaded
    or preloaded, when this is already the re-executed process, or when none is installed.
    """
    if choice == "system" or environ.get(_REEXEC_MARKER) or loaded_allocator() in _FAST:
        return
    if environ.get("LD_PRELOAD"):
        return  # the operator chose what to preload
    library = find_tcmalloc()
    if library is None:
        log = logger.warning if choice == "tcmalloc" else logger.info
        log("tcmalloc is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4); "
            "running on glibc malloc, which is slower for CPU inference")
        return
    env = {**environ, "LD_PRELOAD": library, _REEXEC_MARKER: "1"}
    logger.info("restarting with %s preloaded", library)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "app", *argv], env)
