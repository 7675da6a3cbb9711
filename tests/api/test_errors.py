"""Every error status, as JSON with a request id and never a stack trace."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from PIL import Image

from tests.serving_helpers import fast_settings, jpeg, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "request_id"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def strict(checkpoint_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An app with small limits."""
    settings = fast_settings(checkpoint_root, default_model="colors", max_upload_bytes=60_000,
                             max_images_per_request=2, max_pixels=200_000)
    async with running_app(settings) as (http, _app):
        yield http


async def test_400_undecodable_names_the_file(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", files=[
        ("file", ("ok.jpg", jpeg("red"), "image/jpeg")),
        ("file", ("notes.txt", b"just some text, not an image", "image/jpeg"))])
    assert_error(r, 400, "notes.txt")


async def test_400_truncated_and_empty(client: httpx.AsyncClient) -> None:
    data = jpeg("red", size=(200, 200))
    r = await client.post("/predict", files={"file": ("cut.jpg", data[: len(data) // 3])})
    assert_error(r, 400, "cut.jpg")
    r = await client.post("/predict", content=b"", headers={"Content-Type": "image/jpeg"})
    assert_error(r, 400, "body", "empty")


@pytest.mark.parametrize("name", ["nope", "../../etc/passwd", "colors/../tags"])
async def test_404_unknown_model_lists_known(client: httpx.AsyncClient, name: str) -> None:
    r = await client.post("/predict", params={"model": name},
                          files={"file": ("a.jpg", jpeg("red"))})
    assert_error(r, 404, "colors", "tags")
    assert_error(await client.get(f"/models/{name}"), 404) if "/" not in name else None


async def test_413_declared_body_too_large(strict: httpx.AsyncClient) -> None:
    big = jpeg("red", size=(600, 600)) * 3
    assert len(big) > 60_000
    r = await strict.post("/predict", content=big, headers={"Content-Type": "image/jpeg"})
    assert_error(r, 413, "bytes")


async def test_413_streamed_body_too_large(strict: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\xff" * 10_000

    r = await strict.post("/predict", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert_error(r, 413, "limit")


async def test_413_too_many_images(strict: httpx.AsyncClient) -> None:
    files = [("file", (f"{i}.jpg", jpeg("red", seed=i))) for i in range(3)]
    assert_error(await strict.post("/predict", files=files), 413, "2")


async def test_413_pixel_bomb(strict: httpx.AsyncClient) -> None:
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, "PNG")  # tiny file, 25 megapixels
    assert len(buf.getvalue()) < 60_000
    r = await strict.post("/predict", files={"file": ("bomb.png", buf.getvalue())})
    assert_error(r, 413, "bomb.png", "pixels")


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", None])
async def test_415_unsupported_media_type(client: httpx.AsyncClient, ctype: str | None) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    r = await client.post("/predict", content=b"hello", headers=headers)
    assert_error(r, 415, "multipart")


@pytest.mark.parametrize("params, word", [
    ({"top_k": 0}, "top_k"), ({"top_k": "many"}, "top_k"), ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"), ({"threshold": "nan"}, "threshold"),
])
async def test_422_bad_parameters(client: httpx.AsyncClient, params: dict, word: str) -> None:
    r = await client.post("/predict", params=params, files={"file": ("a.jpg", jpeg("red"))})
    assert_error(r, 422, word)


async def test_422_wrong_multipart_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", files={"image": ("a.jpg", jpeg("red"))})
    assert_error(r, 422, "'file'", "image")
    r = await client.post("/predict", data={"file": "not a file"},
                          files={"other": ("a.jpg", jpeg("red"))})
    assert_error(r, 422, "file")


async def test_400_broken_multipart(client: httpx.AsyncClient) -> None:
    r = await client.post("/predict", content=b"--xx\r\ngarbage",
                          headers={"Content-Type": "multipart/form-data; boundary=xx"})
    assert r.status_code in (400, 422), r.text
    assert_error(r, r.status_code)


async def test_404_unknown_route_and_405(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nothing-here"), 404)
    assert_error(await client.get("/predict"), 405)


async def test_422_model_required_when_several_and_no_default(checkpoint_root: Path) -> None:
    async with running_app(fast_settings(checkpoint_root)) as (http, _app):
        r = await http.post("/predict", files={"file": ("a.jpg", jpeg("red"))})
        assert_error(r, 422, "colors", "tags")
        ok = await http.post("/predict", params={"model": "tags"},
                             files={"file": ("a.jpg", jpeg("red"))})
        assert ok.status_code == 200
