"""The load generator's bookkeeping: percentiles, batch sizes from /metrics, server CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from app.serving.compute import name_native_thread
from bench.load import batch_stats, cpu_by_name, percentile, thread_cpu


def test_percentile_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 95) == 3.0


def test_batch_stats_sums_every_models_histogram() -> None:
    text = "\n".join([
        "# HELP resnet_serve_batch_size images per model batch",
        'resnet_serve_batch_size_bucket{le="1.0",model="a"} 2.0',
        'resnet_serve_batch_size_sum{model="a"} 12.0',
        'resnet_serve_batch_size_count{model="a"} 3.0',
        'resnet_serve_batch_size_sum{model="b"} 8.0',
        'resnet_serve_batch_size_count{model="b"} 1.0',
        "resnet_serve_images_total 20.0",
    ])
    assert batch_stats(text) == (20.0, 4.0)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread CPU is read from /proc")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@linux_only
def test_thread_cpu_splits_by_thread_name_and_counts_child_processes() -> None:
    before = thread_cpu(os.getpid())
    assert f"{os.getpid()}/{os.getpid()}" in before
    assert before[f"{os.getpid()}/{os.getpid()}"][0] == "main"

    def busy() -> None:
        name_native_thread("busy-probe")
        _spin(0.3)
        done.wait(10)  # stay alive until the second snapshot

    done = threading.Event()
    worker = threading.Thread(target=busy)
    worker.start()
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.process_time() + 0.3\n"
                              "while time.process_time() < end: pass\n"
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            spent = cpu_by_name(before, thread_cpu(os.getpid()))
            if spent.get("busy-probe", 0) >= 0.25 and spent.get("main", 0) >= 0.25:
                break
            time.sleep(0.1)
    finally:
        done.set()
        worker.join()
        child.kill()
        child.wait()
    assert spent["busy-probe"] >= 0.25  # the named thread's own time, under its name
    assert spent["main"] >= 0.25  # the child's first thread is a process's "main" too
    assert all(seconds > 0 for seconds in spent.values())


def test_cpu_by_name_sums_threads_of_one_name_and_drops_idle_ones() -> None:
    before = {"1/1": ("main", 1.0), "1/2": ("decode", 0.5), "1/3": ("decode", 0.5),
              "1/4": ("load", 2.0)}
    after = {"1/1": ("main", 1.5), "1/2": ("decode", 0.75), "1/3": ("decode", 1.0),
             "1/4": ("load", 2.0), "1/5": ("compute", 3.0)}
    assert cpu_by_name(before, after) == {"compute": 3.0, "decode": 0.75, "main": 0.5}
    assert list(cpu_by_name(before, after)) == ["compute", "decode", "main"]
