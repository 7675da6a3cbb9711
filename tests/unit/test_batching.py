"""DynamicBatcher on its own: batching policy, limits, deadlines, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from app.exceptions import (
    BatcherClosedError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
)
from app.serving.batching import DynamicBatcher
from models.card import ModelCard
from models.device import Accelerator
from models.predict import Predictor
from tests.serving_helpers import CLASSES, color_image


class Recorder:
    """A real batch function (squares numbers) that records batch sizes and can be held."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.seen: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.started.set()
        self.gate.wait(5)
        self.sizes.append(len(items))
        self.seen.extend(items)
        return [x * x for x in items]


def make(fn=None, **kw) -> DynamicBatcher:
    knobs = dict(max_batch_size=4, max_wait_ms=50, max_queue=16)
    knobs.update(kw)
    batcher = DynamicBatcher(fn or Recorder(), **knobs)
    batcher.start()
    return batcher


async def wait_started(rec: Recorder) -> None:
    while not rec.started.is_set():
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("kw, message", [
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_batch_size=8, max_queue=4), "max_queue"),
    (dict(max_wait_ms=-1), "max_wait_ms"),
    (dict(max_wait_ms=float("inf")), "max_wait_ms"),
])
def test_knobs_validated(kw: dict, message: str) -> None:
    knobs = dict(max_batch_size=4, max_wait_ms=5, max_queue=16)
    knobs.update(kw)
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(lambda items: items, **knobs)
    with pytest.raises(TypeError):
        DynamicBatcher(None, max_batch_size=1, max_wait_ms=0, max_queue=1)  # type: ignore


async def test_lone_caller_does_not_wait_for_company() -> None:
    batcher = make(max_wait_ms=2000)
    began = time.perf_counter()
    assert await batcher.submit([3], timeout=5) == [9]
    assert await batcher.submit([4], timeout=5) == [16]
    assert time.perf_counter() - began < 0.5
    await batcher.stop()


async def test_waiting_callers_share_a_batch_and_get_their_own_outputs() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=8)
    rec.gate.clear()
    first = asyncio.create_task(batcher.submit([1], timeout=5))
    await wait_started(rec)
    rest = [asyncio.create_task(batcher.submit([n], timeout=5)) for n in range(2, 8)]
    await asyncio.sleep(0.02)
    rec.gate.set()
    assert await first == [1]
    assert [await t for t in rest] == [[n * n] for n in range(2, 8)]
    assert rec.sizes == [1, 6]
    assert batcher.stats.batch_sizes == {1: 1, 6: 1}
    await batcher.stop()


async def test_reserved_images_are_waited_for() -> None:
    rec = Recorder()
    batcher = make(rec, max_wait_ms=1000)
    with batcher.reserve(1):
        first = asyncio.create_task(batcher.submit([1], timeout=5))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit([2], timeout=5))
    assert (await first, await second) == ([1], [4])
    assert rec.sizes == [2]
    await batcher.stop()


async def test_large_request_spans_batches_in_order() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=4)
    assert await batcher.submit(list(range(10)), timeout=5) == [n * n for n in range(10)]
    assert rec.sizes == [4, 4, 2]
    await batcher.stop()


async def test_full_queue_refuses_at_once() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=4, max_queue=4)
    rec.gate.clear()
    running = asyncio.create_task(batcher.submit([0, 1, 2, 3], timeout=5))
    await wait_started(rec)
    queued = asyncio.create_task(batcher.submit([4, 5, 6], timeout=5))
    await asyncio.sleep(0)
    began = time.perf_counter()
    with pytest.raises(QueueFullError) as info:
        await batcher.submit([7, 8], timeout=5)
    assert time.perf_counter() - began < 0.05
    assert info.value.retry_after >= 1
    assert batcher.stats.rejected == 2
    rec.gate.set()
    assert await running == [0, 1, 4, 9] and await queued == [16, 25, 36]
    await batcher.stop()


async def test_expired_request_never_reaches_the_model() -> None:
    rec = Recorder()
    batcher = make(rec)
    rec.gate.clear()
    running = asyncio.create_task(batcher.submit([1], timeout=5))
    await wait_started(rec)
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([2, 3], timeout=0.05)
    assert batcher.queued == 0
    rec.gate.set()
    assert await running == [1]
    assert await batcher.submit([4], timeout=5) == [16]
    assert rec.seen == [1, 4]
    assert batcher.stats.dropped["expired"] == 2
    await batcher.stop()


async def test_cancelled_request_is_dropped_and_counted() -> None:
    rec = Recorder()
    batcher = make(rec)
    rec.gate.clear()
    running = asyncio.create_task(batcher.submit([1], timeout=5))
    await wait_started(rec)
    gone = asyncio.create_task(batcher.submit([2, 3, 4], timeout=5))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    rec.gate.set()
    assert await running == [1]
    assert rec.seen == [1]
    assert batcher.stats.dropped["disconnected"] == 3
    await batcher.stop()


async def test_failing_batch_fails_only_its_callers() -> None:
    calls = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise RuntimeError("bad item")
        return items

    batcher = make(flaky, max_wait_ms=0)
    with pytest.raises(BatchFailedError) as info:
        await batcher.submit([13], timeout=5)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert await batcher.submit([1, 2], timeout=5) == [1, 2]
    assert batcher.stats.failed_batches == 1
    await batcher.stop()


async def test_wrong_output_count_is_a_failed_batch() -> None:
    batcher = make(lambda items: items[:-1])
    with pytest.raises(BatchFailedError, match="2 outputs for 3 inputs"):
        await batcher.submit([1, 2, 3], timeout=5)
    await batcher.stop()


async def test_stop_drains_queued_work_then_refuses() -> None:
    rec = Recorder()
    batcher = make(rec, max_batch_size=2, max_wait_ms=0)
    rec.gate.clear()
    tasks = [asyncio.create_task(batcher.submit([n], timeout=5)) for n in range(5)]
    await wait_started(rec)
    stopping = asyncio.create_task(batcher.stop(timeout=5))
    await asyncio.sleep(0.01)
    with pytest.raises(BatcherClosedError):
        await batcher.submit([9], timeout=5)
    rec.gate.set()
    await stopping
    assert [await t for t in tasks] == [[n * n] for n in range(5)]
    assert not batcher.running


async def test_batched_real_predictor_matches_one_by_one(trained_model) -> None:
    model, pre = trained_model
    card = ModelCard(name="colors", arch="resnet18", task="single_label", classes=CLASSES,
                     preprocessing=pre)
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    from models.preprocessing import eval_transform
    transform = eval_transform(pre)
    images = [transform(color_image(CLASSES[i % 3], seed=50 + i)) for i in range(6)]
    batcher = make(lambda items: predictor.probabilities(torch.stack(items)),
                   max_batch_size=4)
    batched = await asyncio.gather(*(batcher.submit([img], timeout=10) for img in images))
    for img, (row,) in zip(images, batched, strict=True):
        alone = predictor.probabilities(img.unsqueeze(0))[0]
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-4)
    assert [int(r[0].argmax()) for r in batched] == [i % 3 for i in range(6)]
    await batcher.stop()
