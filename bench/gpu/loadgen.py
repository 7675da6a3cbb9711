"""One load level against a running server: wrk when installed, else bench.load's client.

Around the measured seconds: the server tree's CPU by stage (bench.gpu.stages), the mean
batch it ran (its /metrics, where it has one) and the GPU's utilisation (bench.gpu.gpu_sampler).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from bench.frontend import mean_batch
from bench.gpu.gpu_sampler import GpuSampler
from bench.gpu.stages import cpu_by_stage, process_table
from bench.load import run_level as httpx_level
from bench.load import thread_cpu
from bench.wrk import request_bodies, run_wrk, write_script, wrk_binary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A running server: its base URL and the process id its CPU is counted from."""

    base: str
    root_pid: int


def loadgen_name() -> str:
    """Which load generator this machine uses."""
    return "wrk" if wrk_binary() else "httpx (bench.load; wrk is not installed)"


def wrk_threads() -> int:
    """wrk's threads: one per four cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) // 4)


def measure(target: Target, jpegs: list[bytes], *, path: str, images: int, concurrency: int,
            seconds: float, warmup: float, work_dir: Path) -> dict:
    """Warm up, then load `path` with `images` JPEGs per request for `seconds`; the figures."""
    script = None
    if wrk_binary():
        script = write_script(work_dir / f"{path.strip('/')}-{images}",
                              request_bodies(jpegs, images), path=path)
    if warmup:
        _load(target, jpegs, script, path, images, concurrency, warmup)
    batches0, cpu0 = mean_batch(target.base), thread_cpu(target.root_pid)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with GpuSampler() as gpu:
        level = _load(target, jpegs, script, path, images, concurrency, seconds)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, batches1 = thread_cpu(target.root_pid), mean_batch(target.base)
    stages = cpu_by_stage(cpu0, cpu1, target.root_pid, process_table(cpu1))
    per_image = 1000 / max(1, level["ok"] * images)
    batch = None
    if batches0 and batches1 and batches1[1] > batches0[1]:
        batch = round((batches1[0] - batches0[0]) / (batches1[1] - batches0[1]), 2)
    if script is not None:  # wrk is a child process; the httpx client counts its own CPU
        wall = level["seconds"]
        level["loadgen_cpu_pct"] = round(100 * ((kids1.ru_utime - kids0.ru_utime)
                                                + (kids1.ru_stime - kids0.ru_stime)) / wall, 1)
    return {**level, "mean_batch": batch, "gpu": gpu.result(),
            "server_cpu_ms_per_image": round(sum(stages.values()) * per_image, 3),
            "cpu_ms_per_image_by_stage": {k: round(s * per_image, 3) for k, s in stages.items()}}


def _load(target: Target, jpegs: list[bytes], script: Path | None, path: str, images: int,
          concurrency: int, seconds: float) -> dict:
    """One run of the load generator: requests, errors, rates and latency."""
    if script is None:
        level = asyncio.run(httpx_level(target.base, concurrency=concurrency, images=images,
                                        seconds=seconds, max_requests=10**7, jpegs=jpegs,
                                        path=path))
        return {k: level[k] for k in ("concurrency", "images_per_request", "requests", "ok",
                                      "errors", "seconds", "req_per_s", "images_per_s",
                                      "p50_ms", "p99_ms", "loadgen_cpu_pct")}
    wrk = run_wrk(target.base + path, script, concurrency=concurrency, seconds=seconds,
                  threads=wrk_threads())
    return {"concurrency": concurrency, "images_per_request": images, "requests": wrk.requests,
            "ok": wrk.ok, "errors": wrk.errors, "seconds": round(wrk.seconds, 2),
            "req_per_s": round(wrk.ok / wrk.seconds, 2),
            "images_per_s": round(wrk.ok * images / wrk.seconds, 2),
            "p50_ms": round(wrk.p50_ms, 1), "p99_ms": round(wrk.p99_ms, 1)}
