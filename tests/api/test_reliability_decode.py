"""What an upload can make the service spend on decoding, through POST /predict."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from PIL import Image

from tests.api.test_reliability_inputs import assert_error, assert_healthy
from tests.decode_gate import HEAVY, Gate
from tests.imagegen import ico_embedding, icon, png_bomb, rgba_png_within_budget, strip_png
from tests.serving_helpers import fast_settings, inside, png, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(checkpoint_root: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The colour model, two decode processes, a 1.5 s request timeout."""
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
                 400, "app.icns", "accepted: JPEG, MPO, PNG")


async def test_slow_decodes_get_504_at_the_deadline_and_do_not_starve_others(
        served, tmp_path: Path) -> None:
    http, app = served
    model = inside(app).model("colors")
    real, gate = model.crop, Gate(tmp_path, model.crop)
    model.crop = gate.recipe
    try:
        heavy = [("file", (f"h{i}.png", png("red", seed=i, size=HEAVY))) for i in range(4)]
        slow = asyncio.ensure_future(http.post("/predict", files=heavy))
        while not gate.heavy_started():
            await asyncio.sleep(0.01)
        quick = await http.post("/predict", files={"file": ("q.png", png("blue"))})
        assert quick.status_code == 200, quick.text
        assert quick.json()["results"][0]["predictions"][0]["label"] == "blue"
        assert_error(await slow, 504, "decoding")
        assert gate.heavy_started() == 1  # its share of one process; the rest never started
    finally:
        gate.release()
        model.crop = real


async def test_an_image_over_the_decode_memory_limit_is_413_and_costs_nothing_else(
        checkpoint_root: Path) -> None:
    """A 3000x3000 RGBA PNG of a few kB, within the pixel budget, needs well over the 64 MiB
    its decode process may use: that process fails it (413) and is replaced."""
    settings = fast_settings(checkpoint_root, default_model="colors", decode_workers=1,
                             decode_memory_mb=64)
    async with running_app(settings) as (http, _app):
        data = rgba_png_within_budget(3000, 3000)
        assert len(data) < 100_000
        assert_error(await http.post("/predict", files={"file": ("alpha.png", data)}), 413,
                     "alpha.png", "64 MiB")
        r = await http.post("/predict", files={"file": ("after.png", png("red"))})
        assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "red"
        await assert_healthy(http)
