"""How many worker processes `--workers 0` (automatic) means on this host."""

from __future__ import annotations

import math

from app.config import available_cpus


def workers_for(requested: int, *, on_cuda: bool, cpus: int | None = None) -> int:
    """The worker count for `--workers` (0: automatic).

    Automatic: one on the CPU, where the model needs every core and a second process would
    only split them; on CUDA one per four cores (each worker's decode processes keep about
    that many busy), at least one and at most 16.
    """
    if requested:
        return requested
    if not on_cuda:
        return 1
    cpus = cpus or available_cpus()
    return max(1, min(16, math.floor(cpus / 4)))
