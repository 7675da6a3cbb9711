"""POST /explain, the report files of loaded models, and the page at GET /."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from PIL import Image

from app.api.routes.page import CONTENT_SECURITY_POLICY
from tests.serving_helpers import (
    CROP,
    color_image,
    encode,
    fast_settings,
    jpeg,
    metric,
    png,
    running_app,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "page-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CURVES = encode(color_image("green", size=(20, 10)), "PNG")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[httpx.AsyncClient]:
    """An app with an API key over `colors` (with a curves.png beside it) and `tags`;
    `secrets.txt` lies beside the card, where a path built from a request could reach."""
    root = tmp_path_factory.mktemp("explain")
    for name in ("colors", "tags"):
        shutil.copytree(checkpoint_root / name, root / name)
    (root / "colors" / "curves.png").write_bytes(CURVES)
    (root / "colors" / "secrets.txt").write_text("not for the web")
    settings = fast_settings(root, default_model="colors", api_keys=[KEY])
    async with running_app(settings) as (http, _app):
        http.headers.update(AUTH)
        yield http


def _png_pixels(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.convert("RGB")


async def test_explain_answers_a_heatmap_per_image(client: httpx.AsyncClient) -> None:
    files = [("file", ("r.jpg", jpeg("red", seed=3), "image/jpeg")),
             ("file", ("b.png", png("blue", seed=4), "image/png"))]
    r = await client.post("/explain", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "colors"
    assert [(e["filename"], e["class"]) for e in body["results"]] == [("r.jpg", "red"),
                                                                     ("b.png", "blue")]
    predicted = (await client.post("/predict", files=files)).json()["results"]
    for explained, result in zip(body["results"], predicted, strict=True):
        assert explained["score"] == pytest.approx(result["predictions"][0]["score"], abs=1e-5)
        assert _png_pixels(base64.b64decode(explained["heatmap"])).size == (CROP, CROP)


async def test_explain_batches_are_counted_apart_from_predictions(
        client: httpx.AsyncClient) -> None:
    def counts(text: str) -> tuple[float, float, float]:
        return (metric(text, "resnet_serve_images_explained_total", model="colors"),
                metric(text, "resnet_serve_explain_batch_size_count", model="colors"),
                metric(text, "resnet_serve_images_total", model="colors"))

    before = counts((await client.get("/metrics")).text)
    files = [("file", (f"{i}.png", png("red", seed=i), "image/png")) for i in range(3)]
    assert (await client.post("/explain", files=files)).status_code == 200
    after = counts((await client.get("/metrics")).text)
    assert after[0] - before[0] == 3  # three images explained
    assert after[1] > before[1]  # in at least one explain batch
    assert after[2] == before[2]  # and not counted as predictions


async def test_explain_a_named_class_as_a_png(client: httpx.AsyncClient) -> None:
    upload = {"file": ("g.jpg", jpeg("green", seed=5), "image/jpeg")}
    r = await client.post("/explain", params={"class": "blue"}, files=upload,
                          headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-explained-class"] == "blue"
    assert 0.0 <= float(r.headers["x-score"]) < 0.5  # a green image is not blue
    assert _png_pixels(r.content).size == (CROP, CROP)
    raw = await client.post("/explain", params={"format": "png", "model": "tags"},
                            content=png("red"), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.headers["x-explained-class"] == "red"


@pytest.mark.parametrize(("params", "body", "status", "words"), [
    ({"class": "purple"}, jpeg("red"), 422, "unknown class 'purple'"),
    ({"class": "x" * 600}, jpeg("red"), 422, "class"),
    ({"format": "gif"}, jpeg("red"), 422, "format"),
    ({}, b"not an image", 400, "body"),
    ({"model": "nope"}, jpeg("red"), 404, "unknown model"),
])
async def test_explain_errors(client: httpx.AsyncClient, params: dict[str, str], body: bytes,
                              status: int, words: str) -> None:
    r = await client.post("/explain", params=params, content=body,
                          headers={"Content-Type": "image/jpeg"})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    if "purple" in words:
        assert all(c in r.json()["detail"] for c in ("'red'", "'green'", "'blue'"))


async def test_explain_refuses_several_images_as_one_png(client: httpx.AsyncClient) -> None:
    files = [("file", (f"{i}.jpg", jpeg("red", seed=i), "image/jpeg")) for i in range(2)]
    r = await client.post("/explain", params={"format": "png"}, files=files)
    assert r.status_code == 422 and "one image" in r.json()["detail"]
    empty = await client.post("/explain", files={"other": ("x.txt", b"hi")})
    assert empty.status_code == 422
    typed = await client.post("/explain", content=b"{}",
                              headers={"Content-Type": "application/json"})
    assert typed.status_code == 415


async def test_explain_needs_the_key(client: httpx.AsyncClient) -> None:
    r = await client.post("/explain", content=jpeg("red"),
                          headers={"Content-Type": "image/jpeg", "Authorization": ""})
    assert r.status_code == 401


async def test_reports_of_loaded_models_only(client: httpx.AsyncClient) -> None:
    assert (await client.get("/models/colors/reports")).json() == {"reports": ["curves.png"]}
    assert (await client.get("/models/tags/reports")).json() == {"reports": []}
    r = await client.get("/models/colors/reports/curves.png")
    assert r.status_code == 200 and r.content == CURVES
    assert r.headers["content-type"] == "image/png"
    assert (await client.get("/models/colors/reports/curves.png",
                             headers={"Authorization": ""})).status_code == 401


@pytest.mark.parametrize("path", [
    "/models/colors/reports/confusion_matrix.png",  # allowed, not written
    "/models/colors/reports/card.json",
    "/models/colors/reports/secrets.txt",
    "/models/colors/reports/model.safetensors",
    "/models/colors/reports/..%2Fcolors%2Fcard.json",
    "/models/colors/reports/%2e%2e%2fsecrets.txt",
    "/models/colors/reports/%2e%2e",
    "/models/colors/reports/%2e%2e%2f%2e%2e%2fcolors%2fcard.json",
    "/models/..%2Fcolors/reports/curves.png",
    "/models/nope/reports/curves.png",
    "/models/colors/reports/curves.png%00.txt",
])
async def test_reports_never_serve_other_files(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert b"not for the web" not in r.content and b"format_version" not in r.content


async def test_the_page_loads_without_a_key_with_its_policy(client: httpx.AsyncClient) -> None:
    no_key = {"Authorization": ""}
    page = await client.get("/", headers=no_key)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/page/app.js"' in page.text and "<script>" not in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = await client.get(f"/page/{asset}", headers=no_key)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "https://" not in r.text and "innerHTML" not in r.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data: blob:" in policy
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for other in ("/page/index.html", "/page/secrets.txt", "/page/..%2Fapi%2Fpage.py"):
        assert (await client.get(other, headers=no_key)).status_code == 404
    assert (await client.get("/models", headers=no_key)).status_code == 401
