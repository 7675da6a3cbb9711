"""Every real-world image format through POST /predict: 200 and a sensible prediction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch

from tests.imagegen import exif_rotated, good_images
from tests.serving_helpers import COLORS, fast_settings, inside, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")

RED = COLORS["red"]
GOOD = good_images(RED)
GRAY = {"gray.png", "gray16.png"}  # no colour left to classify: checked for agreement instead
MEDIA = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp",
         "bmp": "image/bmp", "tiff": "image/tiff"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(checkpoint_root: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The colour model serving with default limits, and its app."""
    async with running_app(fast_settings(checkpoint_root, default_model="colors")) as pair:
        yield pair


def media_type(name: str) -> str:
    """The content type a client would send for a file name."""
    return MEDIA[name.rsplit(".", 1)[1]]


@pytest.mark.parametrize("name", sorted(set(GOOD) - GRAY - {"rotated.jpg"}))
async def test_colour_format_predicts_red(served, name: str) -> None:
    http, _app = served
    r = await http.post("/predict", files={"file": (name, GOOD[name], media_type(name))})
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["filename"] == name
    assert result["predictions"][0]["label"] == "red", result


@pytest.mark.parametrize("name", ["baseline.jpg", "palette.png", "animated.gif", "image.webp",
                                  "image.tiff", "tiny.png", "wide.jpg"])
async def test_raw_body_of_each_kind(served, name: str) -> None:
    http, _app = served
    r = await http.post("/predict", content=GOOD[name],
                        headers={"Content-Type": media_type(name)})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["predictions"][0]["label"] == "red"


async def test_grayscale_depths_agree(served) -> None:
    http, _app = served
    files = [("file", (name, GOOD[name], "image/png")) for name in sorted(GRAY)]
    r = await http.post("/predict", files=files, params={"all_scores": "true"})
    assert r.status_code == 200, r.text
    eight, sixteen = r.json()["results"]
    assert eight["predictions"][0]["label"] == sixteen["predictions"][0]["label"]
    for label, score in eight["scores"].items():
        assert sixteen["scores"][label] == pytest.approx(score, abs=0.05)


async def test_every_format_in_one_request(served) -> None:
    http, _app = served
    files = [("file", (name, data, media_type(name))) for name, data in GOOD.items()]
    r = await http.post("/predict", files=files, params={"top_k": 1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["filename"] for res in results] == list(GOOD)
    colour = [res["predictions"][0]["label"] for res in results
              if res["filename"] not in GRAY | {"rotated.jpg"}]
    assert colour == ["red"] * len(colour)


async def test_exif_rotation_happens_before_classification(served) -> None:
    """The sideways photo reaches the model upright: red on top, blue below."""
    http, app = served
    seen: list[torch.Tensor] = []

    def spy(items: list[torch.Tensor], real) -> torch.Tensor:
        seen.extend(items)
        return real(items)

    with inside(app).batches_through("colors", spy):
        r = await http.post("/predict", files={"file": ("phone.jpg", exif_rotated(RED))})
    assert r.status_code == 200, r.text
    [image] = seen  # uint8 [3, H, W] after the card's resize and crop
    red, blue = image[0].float(), image[2].float()
    height = red.shape[0]
    top, bottom = slice(0, height // 2), slice(height // 2, height)
    assert red[top].mean() > 150 and blue[top].mean() < 80, "top half should be red"
    assert blue[bottom].mean() > 150 and red[bottom].mean() < 80, "bottom half should be blue"
    assert r.json()["results"][0]["predictions"][0]["label"] in {"red", "blue"}
