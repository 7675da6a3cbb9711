"""POST /feedback against the in-process app: off unless configured, behind the API key,
the image decoded and stored once under its class, labels checked, a quota answered with 507
and nothing left; and /predict keeping its least-sure images for review when asked."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from fastapi import FastAPI
from PIL import Image

from tests.serving_helpers import fast_settings, inside, jpeg, png, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = {"X-API-Key": "feedback-key"}
QUOTA = 40_000


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock")


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def on(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> AsyncIterator[tuple[httpx.AsyncClient, Path, FastAPI]]:
    """An app with feedback on (a small quota) and every /predict image kept for review."""
    root = tmp_path_factory.mktemp("feedback")
    settings = fast_settings(checkpoint_root, default_model="colors", feedback_dir=root,
                             feedback_quota_bytes=QUOTA, review_rate=1.0,
                             review_confidence=1.0, api_keys=[KEY["X-API-Key"]])
    async with running_app(settings) as (http, app):
        http.headers.update(KEY)
        yield http, root, app


async def test_feedback_is_off_unless_a_folder_is_set(client: httpx.AsyncClient) -> None:
    r = await client.post("/feedback", files={"file": ("r.jpg", jpeg("red"), "image/jpeg")},
                          data={"label": "red"})
    assert r.status_code == 404
    assert "--feedback-dir" in r.json()["detail"]


async def test_an_image_is_stored_once_under_its_label(on) -> None:
    http, root, _app = on
    image = jpeg("red", seed=11)
    r = await http.post("/feedback", files={"file": ("mine.jpg", image, "image/jpeg")},
                        data={"label": "red"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "colors" and body["status"] == "created"
    assert (root / "colors" / "data" / body["image"]).read_bytes() == image
    again = await http.post("/feedback", files={"file": ("copy.jpg", image, "image/jpeg")},
                            data={"label": "red"})
    assert again.json()["status"] == "unchanged"
    assert len(list((root / "colors" / "data" / "red").iterdir())) == 1
    no_key = await http.post("/feedback", files={"file": ("x.jpg", image, "image/jpeg")},
                             data={"label": "red"}, headers={"X-API-Key": ""})
    assert no_key.status_code == 401


async def test_multi_label_feedback_is_a_csv_row(on) -> None:
    http, root, _app = on
    r = await http.post("/feedback?model=tags",
                        files=[("file", ("t.png", png("blue", seed=12), "image/png"))],
                        data={"label": ["blue", "green"]})
    assert r.status_code == 200, r.text
    table = (root / "tags" / "data" / "labels.csv").read_text().splitlines()
    assert table[0] == "image,labels"
    assert table[1] == f"{r.json()['image']},blue green"


async def test_bad_feedback_is_refused_and_leaves_nothing(on) -> None:
    http, root, _app = on
    before = _files(root / "colors" / "data") if (root / "colors").exists() else []
    image = jpeg("green", seed=13)
    cases = [
        ({"file": ("g.jpg", image, "image/jpeg")}, {"label": "purple"}, 422, "unknown label"),
        ({"file": ("g.jpg", image, "image/jpeg")}, {}, 422, "field 'label'"),
        ({"file": ("g.jpg", image, "image/jpeg")}, {"label": ["red", "green"]}, 422,
         "one label"),
        ({"file": ("g.jpg", b"\xff\xd8\xff not really", "image/jpeg")}, {"label": "green"},
         400, "g.jpg"),
        ({"file": ("g.txt", b"hello", "text/plain")}, {"label": "green"}, 400, "g.txt"),
    ]
    for files, data, status, message in cases:
        r = await http.post("/feedback", files=files, data=data)
        assert r.status_code == status, (data, r.text)
        assert message in r.json()["detail"], r.text
    two = await http.post("/feedback", files=[("file", ("a.jpg", image, "image/jpeg")),
                                              ("file", ("b.jpg", image, "image/jpeg"))],
                          data={"label": "green"})
    assert two.status_code in (400, 422), two.text
    raw = await http.post("/feedback", content=image, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 415
    after = _files(root / "colors" / "data") if (root / "colors").exists() else []
    assert after == before


async def test_past_the_quota_a_clear_507_and_nothing_left(on) -> None:
    http, root, _app = on
    big = _noise_png(120)
    assert len(big) > QUOTA
    before = _files(root)
    r = await http.post("/feedback", files={"file": ("big.png", big, "image/png")},
                        data={"label": "blue"})
    assert r.status_code == 507, r.text
    assert "quota" in r.json()["detail"] and "nothing was written" in r.json()["detail"]
    assert [f for f in _files(root) if "/review/" not in f] == \
        [f for f in before if "/review/" not in f]


async def test_predict_keeps_its_least_sure_images_for_review(on) -> None:
    http, root, app = on
    image = png("green", seed=14)
    r = await http.post("/predict", files={"file": ("look.png", image, "image/png")})
    assert r.status_code == 200, r.text
    await inside(app).feedback.review.drained()
    review = root / "colors" / "review"
    lines = [json.loads(line) for line in (review / "predictions.jsonl").read_text().splitlines()]
    kept = {line["image"]: line for line in lines}
    [name] = [n for n, line in kept.items() if line["filename"] == "look.png"]
    assert (review / name).read_bytes() == image
    assert kept[name]["predictions"][0]["label"] == "green"
    assert 0 < kept[name]["confidence"] < 1
