"""Every bad input gets the right 4xx naming the file, and the service stays healthy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.imagegen import bad_images, png_bomb
from tests.serving_helpers import fast_settings, jpeg, running_app

pytestmark = pytest.mark.asyncio(loop_scope="session")

LIMIT_BYTES = 200_000
BAD = bad_images()
TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "..\\..\\etc\\passwd", "/etc/passwd", "colors/../../etc/passwd",
              "%252e%252e%252fetc%252fpasswd", "colors\x00", "."]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(checkpoint_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The colour model with a small byte limit and at most 4 images per request."""
    settings = fast_settings(checkpoint_root, default_model="colors",
                             max_upload_bytes=LIMIT_BYTES, max_images_per_request=4,
                             max_pixels=4_000_000)
    async with running_app(settings) as (client, _app):
        yield client
        await assert_healthy(client)


async def assert_healthy(http: httpx.AsyncClient) -> None:
    """Ready, and a good image still gets its answer."""
    assert (await http.get("/ready")).status_code == 200
    r = await http.post("/predict", files={"file": ("ok.jpg", jpeg("blue"))})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["predictions"][0]["label"] == "blue"


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    """A JSON error body with the status, the request id, the words, and no traceback."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "request_id"} and body["request_id"]
    assert "Traceback" not in r.text
    for word in words:
        assert word in body["detail"], body["detail"]


@pytest.mark.parametrize("name", sorted(BAD))
async def test_bad_file_in_multipart_is_400_naming_it(http, name: str) -> None:
    files = [("file", ("fine.jpg", jpeg("red"), "image/jpeg")),
             ("file", (name, BAD[name], "image/jpeg"))]
    assert_error(await http.post("/predict", files=files), 400, name)
    await assert_healthy(http)


@pytest.mark.parametrize("name", sorted(BAD))
async def test_bad_raw_body_is_400(http, name: str) -> None:
    r = await http.post("/predict", content=BAD[name], headers={"Content-Type": "image/png"})
    assert_error(r, 400, "body")


async def test_decompression_bomb_is_413_naming_the_file(http) -> None:
    bomb = png_bomb()  # 400 megapixels in a few kilobytes
    assert len(bomb) < LIMIT_BYTES
    assert_error(await http.post("/predict", files={"file": ("bomb.png", bomb)}), 413,
                 "bomb.png", "pixels")
    assert_error(await http.post("/predict", content=bomb,
                                 headers={"Content-Type": "image/png"}), 413, "pixels")
    await assert_healthy(http)


async def test_too_many_images_is_413(http) -> None:
    files = [("file", (f"{i}.jpg", jpeg("red", seed=i))) for i in range(5)]
    assert_error(await http.post("/predict", files=files), 413, "4")


@pytest.mark.parametrize("multipart", [False, True])
async def test_upload_over_the_byte_limit_is_413(http, multipart: bool) -> None:
    big = b"\xff\xd8" + b"\x00" * LIMIT_BYTES
    r = (await http.post("/predict", files={"file": ("big.jpg", big)}) if multipart
         else await http.post("/predict", content=big, headers={"Content-Type": "image/jpeg"}))
    assert_error(r, 413, "limit")


async def test_wrong_multipart_field_is_422(http) -> None:
    assert_error(await http.post("/predict", files={"image": ("a.jpg", jpeg("red"))}), 422,
                 "'file'")


@pytest.mark.parametrize("ctype", ["text/html", "text/plain", "application/json",
                                   "application/octet-stream", "application/x-www-form-urlencoded",
                                   "multipartform-data", ""])
async def test_wrong_content_type_is_415(http, ctype: str) -> None:
    r = await http.post("/predict", content=jpeg("red"), headers={"Content-Type": ctype})
    assert_error(r, 415, "content type")


async def test_html_posing_as_an_image_is_400(http) -> None:
    page = b"<!doctype html><html><body>not a picture</body></html>"
    r = await http.post("/predict", files={"file": ("cat.jpg", page, "image/jpeg")})
    assert_error(r, 400, "cat.jpg")


@pytest.mark.parametrize("params, word", [
    ({"top_k": 0}, "top_k"), ({"top_k": -1}, "top_k"), ({"top_k": 10**9}, "top_k"),
    ({"top_k": 10**30}, "top_k"), ({"top_k": "1e3"}, "top_k"),
    ({"threshold": 1.0001}, "threshold"), ({"threshold": -1e-9}, "threshold"),
    ({"threshold": "inf"}, "threshold"), ({"threshold": "nan"}, "threshold"),
    ({"all_scores": "maybe"}, "all_scores"), ({"model": "x" * 200}, "model"),
])
async def test_bad_parameters_are_422(http, params: dict, word: str) -> None:
    r = await http.post("/predict", params=params, files={"file": ("a.jpg", jpeg("red"))})
    assert_error(r, 422, word)


@pytest.mark.parametrize("name", TRAVERSALS)
async def test_path_like_model_names_are_404(http, name: str) -> None:
    r = await http.post("/predict", params={"model": name},
                        files={"file": ("a.jpg", jpeg("red"))})
    assert_error(r, 404, "colors")
    assert "root:" not in r.text


@pytest.mark.parametrize("raw_path", [
    "/models/..%2F..%2Fetc%2Fpasswd", "/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/models/..%252F..%252Fetc%252Fpasswd", "/models/%2e%2e", "/models/colors%00",
])
async def test_path_like_names_in_the_url_are_404(http, raw_path: str) -> None:
    r = await http.get(httpx.URL("http://test" + raw_path))
    assert_error(r, 404)
    assert "root:" not in r.text and "card" not in r.json()


async def test_healthy_after_the_whole_matrix(http) -> None:
    await assert_healthy(http)
    metrics = (await http.get("/metrics")).text
    assert 'status="500"' not in metrics
