"""gpu_decode=on (here on the CPU device) answers /predict as gpu_decode=off does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.jpegs import corrupt_scan, jpeg_bytes, scene, with_frame_size
from tests.serving_helpers import color_image, fast_settings, inside, png, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def clients(checkpoint_root: Path) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """Two apps over the same checkpoints: JPEGs decoded by the device decoder, or not."""
    on = fast_settings(checkpoint_root, default_model="colors", gpu_decode="on")
    off = fast_settings(checkpoint_root, default_model="colors", gpu_decode="off")
    async with running_app(on) as (on_http, on_app), running_app(off) as (off_http, off_app):
        assert inside(on_app).model("colors").device_decoder is not None
        assert inside(off_app).model("colors").device_decoder is None
        yield {"on": on_http, "off": off_http}


def uploads() -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for i, (name, size) in enumerate([("red", (48, 40)), ("green", (320, 240)),
                                      ("blue", (800, 600)), ("red", (90, 600))]):
        data = jpeg_bytes(color_image(name, seed=i, size=size), progressive=i % 2 == 1)
        files.append(("file", (f"{name}-{i}.jpg", data, "image/jpeg")))
    files.append(("file", ("scene.jpg", jpeg_bytes(scene(640, 480)), "image/jpeg")))
    files.append(("file", ("green.png", png("green"), "image/png")))
    return files


async def test_device_decode_gives_the_same_answers(clients: dict[str, httpx.AsyncClient]
                                                     ) -> None:
    answers = {}
    for mode, client in clients.items():
        r = await client.post("/predict", files=uploads(), params={"all_scores": "true"})
        assert r.status_code == 200, r.text
        answers[mode] = r.json()["results"]
    assert [res["filename"] for res in answers["on"]] == [f[1][0] for f in uploads()]
    for on, off in zip(answers["on"], answers["off"], strict=True):
        assert on["predictions"][0]["label"] == off["predictions"][0]["label"], on["filename"]
        for label, score in off["scores"].items():
            assert on["scores"][label] == pytest.approx(score, abs=0.02), on["filename"]
    assert [res["predictions"][0]["label"] for res in answers["on"][:4]] == \
        ["red", "green", "blue", "red"]
    # the JPEGs went through the device decoder (its pixels differ a little), the PNG not
    assert answers["on"][-1]["scores"] == answers["off"][-1]["scores"]
    assert any(on["scores"] != off["scores"]
               for on, off in zip(answers["on"][:-1], answers["off"][:-1], strict=True))


async def test_a_corrupt_jpeg_is_still_a_400(clients: dict[str, httpx.AsyncClient]) -> None:
    corrupt = corrupt_scan(jpeg_bytes(scene(300, 200)))
    for name, data in (("corrupt.jpg", corrupt), ("cut.jpg", corrupt[:-400])):
        r = await clients["on"].post("/predict", files={"file": (name, data, "image/jpeg")})
        assert r.status_code == 400, r.text
        assert name in r.json()["detail"]


async def test_a_jpeg_claiming_huge_dimensions_is_a_413(clients: dict[str, httpx.AsyncClient]
                                                       ) -> None:
    bomb = with_frame_size(jpeg_bytes(scene(120, 90)), 60_000, 60_000)
    r = await clients["on"].post("/predict", files={"file": ("bomb.jpg", bomb, "image/jpeg")})
    assert r.status_code == 413, r.text
