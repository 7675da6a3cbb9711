"""Where torch runs: one shared compute thread, model loading on threads that exit."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest
import torch

from app.serving.batching import DynamicBatcher
from app.serving.compute import ComputeThread, run_in_fresh_thread
from app.serving.imaging import ImageDecoder, Upload
from models.card import Preprocessing
from models.preprocessing import EvalCrop
from tests.serving_helpers import png

CROP = EvalCrop(Preprocessing(resize=32, crop=32))

pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_fresh_thread_returns_result_and_exits() -> None:
    seen: list[threading.Thread] = []

    def work(a: int, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert await run_in_fresh_thread(work, 2, 3, name="load-x") == 5
    (thread,) = seen
    assert thread is not threading.main_thread()
    assert thread.name == "load-x"
    thread.join(timeout=5)
    assert not thread.is_alive()


async def test_fresh_thread_raises_the_callers_error() -> None:
    def broken() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        await run_in_fresh_thread(broken)


async def test_fresh_thread_cancelled_caller_drops_the_result() -> None:
    release = threading.Event()
    finished = threading.Event()

    def slow() -> int:
        release.wait(5)
        finished.set()
        return 1

    task = asyncio.create_task(run_in_fresh_thread(slow))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    assert await asyncio.to_thread(finished.wait, 5)
    await asyncio.sleep(0.01)  # the late result lands on a cancelled future without error


async def test_batchers_sharing_a_compute_thread_run_on_one_thread() -> None:
    compute = ComputeThread("compute-test")
    threads: dict[str, set[int]] = {"a": set(), "b": set()}

    def recorder(name: str):
        def fn(items: list[int]) -> list[int]:
            threads[name].add(threading.get_ident())
            return [i * 2 for i in items]
        return fn

    batchers = [DynamicBatcher(recorder(n), max_batch_size=4, max_wait_ms=0, max_queue=16,
                               name=n, compute=compute) for n in ("a", "b")]
    for b in batchers:
        b.start()
    results = await asyncio.gather(*(b.submit([i, i + 1], timeout=5)
                                     for i in range(6) for b in batchers))
    assert results[0] == [0, 2] and results[-1] == [10, 12]
    for b in batchers:
        await b.stop()
    assert len(threads["a"] | threads["b"]) == 1
    assert threads["a"] and threads["a"] == threads["b"]
    assert threading.get_ident() not in threads["a"]
    # a batcher never closes a compute thread it was given
    assert await compute.run(lambda: threading.get_ident()) in threads["a"]
    compute.close()


async def test_batcher_without_a_compute_thread_has_its_own() -> None:
    seen: set[int] = set()

    def fn(items: list[int]) -> list[int]:
        seen.add(threading.get_ident())
        return items

    batcher = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=0, max_queue=4)
    batcher.start()
    assert await batcher.submit([1, 2, 3], timeout=5) == [1, 2, 3]
    await batcher.stop()
    assert len(seen) == 1 and threading.get_ident() not in seen


def _os_name(native_id: int) -> str:
    return open(f"/proc/self/task/{native_id}/comm").read().strip()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="OS thread names are read from /proc")


@linux_only
async def test_threads_carry_their_role_as_os_name() -> None:
    compute = ComputeThread()
    decoder = ImageDecoder(workers=1, max_pixels=10**8)
    try:
        assert _os_name(await compute.run(threading.get_native_id)) == "compute"

        await decoder.decode([Upload("a.png", png("red"))], CROP, timeout=10)
        decode_threads = [t for t in threading.enumerate() if t.name.startswith("decode_")]
        assert decode_threads and all(_os_name(t.native_id) == "decode"
                                      for t in decode_threads)

        def own_name() -> str:
            return _os_name(threading.get_native_id())

        assert await run_in_fresh_thread(own_name, name="load") == "load"
        # names longer than Linux keeps are cut, not refused
        assert await run_in_fresh_thread(own_name, name="a-very-long-thread-name") == \
            "a-very-long-thr"
    finally:
        compute.close()
        decoder.close()


@linux_only
async def test_openmp_workers_started_by_the_compute_thread_inherit_its_name() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs single-threaded here: no OpenMP workers")
    before = {t.name for t in Path("/proc/self/task").iterdir()}
    compute = ComputeThread("omp-probe")
    try:
        a = torch.randn(512, 512)
        await compute.run(torch.mm, a, a)  # a parallel op: the thread's OpenMP team starts
        new = [t for t in Path("/proc/self/task").iterdir() if t.name not in before]
        names = [(t / "comm").read_text().strip() for t in new]
        assert names.count("omp-probe") >= 2, names
    finally:
        compute.close()
