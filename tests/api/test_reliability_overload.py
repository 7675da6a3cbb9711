"""Far above capacity: 429 + Retry-After for what does not fit, the rest within deadline."""

from __future__ import annotations

import asyncio
import time
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

TIMEOUT = 5.0


async def timed(http: httpx.AsyncClient, i: int) -> tuple[httpx.Response, float]:
    """One single-image request and its latency in seconds."""
    began = time.perf_counter()
    colour = CLASSES[i % 3]
    r = await http.post("/predict", files={"file": (f"{i}.jpg", jpeg(colour, seed=i))},
                        params={"top_k": 1})
    if r.status_code == 200:
        assert r.json()["results"][0]["predictions"][0]["label"] == colour
    return r, time.perf_counter() - began


async def test_flood_is_refused_quickly_and_latency_recovers(checkpoint_root: Path) -> None:
    settings = fast_settings(checkpoint_root, default_model="colors", max_batch_size=4,
                             max_queue=8, max_images_per_request=4, request_timeout=TIMEOUT)
    async with running_app(settings) as (http, app):
        slow_down(app, "colors", 0.05)  # capacity: about 4 images per 50 ms
        batcher = inside(app).batcher("colors")
        baseline = sorted([(await timed(http, i))[1] for i in range(5)])[2]

        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, batcher.queued + inside(app).reserved("colors"))
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        flood = await asyncio.gather(*(timed(http, i) for i in range(200)))
        sampling = False
        await sampler

        statuses = [r.status_code for r, _ in flood]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= 8 and statuses.count(429) >= 100, statuses.count(200)
        refused = [(r, s) for r, s in flood if r.status_code == 429]
        for r, _ in refused:
            assert int(r.headers["retry-after"]) >= 1
            assert "overloaded" in r.json()["detail"]
        accepted = [s for r, s in flood if r.status_code == 200]
        assert max(accepted) < TIMEOUT, "an accepted request missed its deadline"
        assert peak <= settings.max_queue, f"{peak} images held, bound {settings.max_queue}"

        await asyncio.sleep(0.2)
        after = sorted([(await timed(http, 100 + i))[1] for i in range(5)])[2]
        assert after < 3 * baseline + 0.05, (baseline, after)
        assert batcher.queued == 0 and inside(app).reserved("colors") == 0

        text = (await http.get("/metrics")).text
        assert metric(text, "resnet_serve_overloaded_responses_total") == statuses.count(429)
        assert metric(text, "resnet_serve_requests_total", route="/predict", method="POST",
                      status="500") == 0


async def test_images_being_decoded_count_against_the_queue(checkpoint_root: Path) -> None:
    """Admission happens before decoding, so an overload costs no decode work."""
    settings = fast_settings(checkpoint_root, default_model="colors", max_batch_size=4,
                             max_queue=4, max_images_per_request=4)
    async with running_app(settings) as (http, app):
        # four images being decoded for another request
        with inside(app).batcher("colors").reserve(4):
            r = await http.post("/predict", files={"file": ("late.jpg", jpeg("red"))})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        ok = await http.post("/predict", files={"file": ("now.jpg", jpeg("red"))})
        assert ok.status_code == 200
