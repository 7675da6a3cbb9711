"""Concurrency through the HTTP layer: shared batches, 429, 504, disconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import (
    CLASSES,
    fast_settings,
    inside,
    jpeg,
    metric,
    running_app,
    slow_down,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_concurrent_requests_share_batches(client: httpx.AsyncClient) -> None:
    colours = [CLASSES[i % 3] for i in range(24)]

    async def one(i: int, colour: str) -> str:
        r = await client.post("/predict", params={"top_k": 1},
                              files={"file": (f"{i}.jpg", jpeg(colour, seed=100 + i))})
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["predictions"][0]["label"]

    labels = await asyncio.gather(*(one(i, c) for i, c in enumerate(colours)))
    assert labels == colours  # each caller got its own image's answer
    text = (await client.get("/metrics")).text
    batches = metric(text, "resnet_serve_batch_size_count", model="colors")
    images = metric(text, "resnet_serve_batch_size_sum", model="colors")
    single = metric(text, "resnet_serve_batch_size_bucket", model="colors", le="1.0")
    assert images >= 24
    assert batches < images, "no batch held more than one image"
    assert batches - single >= 1


async def test_queue_full_answers_429_with_retry_after(checkpoint_root: Path) -> None:
    settings = fast_settings(checkpoint_root, default_model="colors", max_batch_size=4,
                             max_queue=4, max_images_per_request=4)
    async with running_app(settings) as (http, app):
        slow_down(app, "colors", 0.3)
        files = [("file", (f"{i}.jpg", jpeg("red", seed=i))) for i in range(4)]
        responses = await asyncio.gather(*(http.post("/predict", files=files)
                                           for _ in range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert "overloaded" in refused.json()["detail"]
        text = (await http.get("/metrics")).text
        assert metric(text, "resnet_serve_overloaded_responses_total") == statuses.count(429)
        assert metric(text, "resnet_serve_images_rejected_total", model="colors") == \
            4 * statuses.count(429)


async def test_deadline_gives_504_and_queued_images_never_run(checkpoint_root: Path) -> None:
    settings = fast_settings(checkpoint_root, default_model="colors", request_timeout=0.4,
                             max_wait_ms=0)
    async with running_app(settings) as (http, app):
        slow_down(app, "colors", 0.8)
        batcher = inside(app).batcher("colors")
        before = batcher.stats.images
        first = asyncio.create_task(http.post("/predict", files={"file": ("a.jpg", jpeg("red"))}))
        await asyncio.sleep(0.1)
        files = [("file", (f"{i}.jpg", jpeg("blue", seed=i))) for i in range(3)]
        second = await http.post("/predict", files=files)
        assert second.status_code == 504, second.text
        assert "timeout" in second.json()["detail"]
        assert (await first).status_code == 504
        await asyncio.sleep(0.9)  # let the running batch finish
        assert batcher.stats.images - before == 1  # only the first image ever ran
        assert batcher.stats.dropped["expired"] == 3
        text = (await http.get("/metrics")).text
        assert metric(text, "resnet_serve_images_dropped_total", model="colors",
                      reason="expired") == 3
        assert metric(text, "resnet_serve_requests_total", route="/predict", method="POST",
                      status="504") == 2


async def test_cancelled_request_is_dropped_before_the_model(checkpoint_root: Path) -> None:
    settings = fast_settings(checkpoint_root, default_model="colors", max_wait_ms=0)
    async with running_app(settings) as (http, app):
        slow_down(app, "colors", 0.5)
        batcher = inside(app).batcher("colors")
        before = batcher.stats.images
        first = asyncio.create_task(http.post("/predict", files={"file": ("a.jpg", jpeg("red"))}))
        await asyncio.sleep(0.1)
        files = [("file", (f"{i}.jpg", jpeg("green", seed=i))) for i in range(2)]
        gone = asyncio.create_task(http.post("/predict", files=files))
        await asyncio.sleep(0.1)
        assert batcher.queued == 2
        gone.cancel()  # the client goes away while its images wait
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.queued == 0
        assert (await first).status_code == 200
        assert batcher.stats.images - before == 1
        assert batcher.stats.dropped["disconnected"] == 2
        text = (await http.get("/metrics")).text
        assert metric(text, "resnet_serve_images_dropped_total", model="colors",
                      reason="disconnected") == 2


async def test_failed_batch_is_a_500_and_the_worker_goes_on(checkpoint_root: Path) -> None:
    settings = fast_settings(checkpoint_root, default_model="colors")
    async with running_app(settings) as (http, app):
        calls = []

        def flaky(items, real):
            calls.append(len(items))
            if len(calls) == 1:
                raise RuntimeError("simulated device failure")
            return real(items)

        inside(app).wrap_batches("colors", flaky)
        bad = await http.post("/predict", files={"file": ("a.jpg", jpeg("red"))},
                              headers={"X-Request-ID": "req-fail-1"})
        assert bad.status_code == 500
        assert "req-fail-1" in bad.json()["detail"]
        assert "simulated" not in bad.text and "Traceback" not in bad.text
        good = await http.post("/predict", files={"file": ("a.jpg", jpeg("red"))})
        assert good.status_code == 200
