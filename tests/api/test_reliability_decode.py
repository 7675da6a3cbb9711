"""What an upload can make the service spend on decoding, through POST /predict."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from PIL import Image

from tests.api.test_reliability_inputs import assert_error, assert_healthy
from tests.imagegen import ico_embedding, icon, png_bomb, strip_png
from tests.serving_helpers import fast_settings, png, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")

HEAVY = (64, 64)  # uploads of this size stand for slow decodes while the gate is closed


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(checkpoint_root: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The colour model, two decode threads, a 1.5 s request timeout."""
    settings = fast_settings(checkpoint_root, default_model="colors", decode_workers=2,
                             request_timeout=1.5, max_pixels=40_000_000,
                             max_upload_bytes=2_000_000)
    async with running_app(settings) as (client, app):
        yield client, app
        await assert_healthy(client)


@pytest.mark.parametrize("size", [(12000, 1), (1, 40000), (40000, 2)])
async def test_extreme_aspect_ratio_is_answered_from_its_centre(served, size) -> None:
    http, _ = served
    r = await http.post("/predict", files={"file": ("strip.png", strip_png(*size))})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["predictions"][0]["label"] == "red"


async def test_icon_with_a_huge_embedded_png_is_413(served) -> None:
    http, _ = served
    data = ico_embedding(png_bomb(13000, 13000))
    assert_error(await http.post("/predict", files={"file": ("fav.ico", data)}), 413,
                 "fav.ico", "13000x13000")
    r = await http.post("/predict", files={"file": ("real.ico", icon(48))})
    assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "red"


async def test_formats_outside_the_accepted_list_are_400_naming_them(served) -> None:
    http, _ = served
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "ICNS")
    assert_error(await http.post("/predict", files={"file": ("app.icns", buf.getvalue())}),
                 400, "app.icns", "accepted: JPEG, PNG")


async def test_slow_decodes_get_504_at_the_deadline_and_do_not_starve_others(served) -> None:
    http, app = served
    model = app.state.registry.get("colors")
    real, release, started = model.transform, threading.Event(), []

    def gated(image: Image.Image):
        started.append(image.size)
        if image.size == HEAVY:
            release.wait(30)
        return real(image)

    model.transform = gated
    try:
        heavy = [("file", (f"h{i}.png", png("red", seed=i, size=HEAVY))) for i in range(4)]
        slow = asyncio.ensure_future(http.post("/predict", files=heavy))
        while HEAVY not in started:
            await asyncio.sleep(0.01)
        quick = await http.post("/predict", files={"file": ("q.png", png("blue"))})
        assert quick.status_code == 200, quick.text
        assert quick.json()["results"][0]["predictions"][0]["label"] == "blue"
        assert_error(await slow, 504, "decoding")
        assert started.count(HEAVY) == 1  # its share of one thread; the rest never started
    finally:
        release.set()
        model.transform = real


async def test_running_out_of_memory_while_decoding_fails_only_that_request(served) -> None:
    http, app = served
    model = app.state.registry.get("colors")
    real = model.transform

    def exhausted(image: Image.Image):
        raise MemoryError()

    model.transform = exhausted
    try:
        r = await http.post("/predict", files={"file": ("big.png", png("red"))})
    finally:
        model.transform = real
    assert_error(r, 503, "big.png", "not enough memory")
    assert r.headers["retry-after"] == "1"
    await assert_healthy(http)
