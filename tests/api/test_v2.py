"""The Open Inference Protocol routes in-process: every bad request is a 400 saying what is
wrong (never a 500), limits and unknown names answer as /predict's do but in the protocol's
`{"error"}` shape, and /predict's and /v2's images share the same batches."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio

from app.api import errors
from app.batching import DeadlineExceededError, QueueFullError
from app.exceptions import NotReadyError
from tests.serving_helpers import CLASSES, CROP, fast_settings, jpeg, png, running_app, slow_down

pytestmark = pytest.mark.asyncio(loop_scope="session")
INFER = "/v2/models/colors/infer"
HEADER = "Inference-Header-Content-Length"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(checkpoint_root: Path) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """An app serving `colors` and `tags`, with a 200 kB body limit, and the app itself."""
    settings = fast_settings(checkpoint_root, default_model="colors", max_upload_bytes=200_000,
                             max_images_per_request=4)
    async with running_app(settings) as (http, app):
        yield http, app


@pytest.fixture
def http(served: tuple[httpx.AsyncClient, object]) -> httpx.AsyncClient:
    return served[0]


def binary_request(header: dict, blob: bytes, *, header_length: int | None = None
                   ) -> dict[str, object]:
    """httpx arguments for a JSON header followed by binary data."""
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return {"content": text + blob, "headers": {HEADER: str(length)}}


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def image_input(*images: bytes, shape: list[int] | None = None) -> dict:
    return {"name": "IMAGE", "datatype": "BYTES", "shape": shape or [len(images)],
            "data": [base64.b64encode(i).decode() for i in images]}


def assert_oip_error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"], body
    assert r.headers["x-request-id"]
    for word in words:
        assert word in body["error"], body["error"]
    return body["error"]


async def test_json_request_answers_json_probabilities(http: httpx.AsyncClient) -> None:
    r = await http.post(INFER, json={"id": "r1", "inputs": [image_input(jpeg("green"))]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "r1" and body["model_name"] == "colors"
    [out] = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("PROBABILITIES", "FP32", [1, 3])
    assert CLASSES[int(np.argmax(out["data"]))] == "green"
    assert abs(sum(out["data"]) - 1) < 1e-5


async def test_binary_output_follows_the_header(http: httpx.AsyncClient) -> None:
    blob = bytes_tensor(jpeg("red"), png("blue"))
    r = await http.post(INFER, **binary_request(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2, 1],
                     "parameters": {"binary_data_size": len(blob)}}],
         "parameters": {"binary_data_output": True}}, blob))
    assert r.status_code == 200, r.text
    length = int(r.headers[HEADER])
    header = json.loads(r.content[:length])
    [out] = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 2 * 3 * 4
    probs = np.frombuffer(r.content[length:], dtype="<f4").reshape(out["shape"])
    assert [CLASSES[i] for i in probs.argmax(1)] == ["red", "blue"]


@pytest.mark.parametrize(("request_kwargs", "words"), [
    ({"content": b"{not json"}, ["invalid inference request", "JSON"]),
    ({"content": b"[1, 2]"}, ["invalid inference request"]),
    ({"json": {"inputs": []}}, ["inputs"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1.5]}]}},
     ["shape"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]}}, ["shape"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1],
                           "data": [1.0]}]}}, ["IMAGE must be BYTES, got FP32"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "TEXT", "shape": [1],
                           "data": ["x"]}]}}, ["unknown datatype 'TEXT'"]),
    ({"json": {"inputs": [{"name": "PHOTO", "datatype": "BYTES", "shape": [1],
                           "data": ["eA=="]}]}}, ["unknown input 'PHOTO'", "IMAGE (BYTES)"]),
    ({"json": {"inputs": [image_input(jpeg("red")), image_input(jpeg("red"))]}},
     ["exactly one input"]),
    ({"json": {"inputs": [image_input(jpeg("red"), shape=[1, 2])]}},
     ["input IMAGE: 1 elements in 'data', its shape [1, 2] says 2"]),
    ({"json": {"inputs": [image_input(jpeg("red"), jpeg("red"), shape=[1, 2])]}},
     ["shape [1, 2], expected [N] or [N, 1]"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                           "data": ["%%%not base64"]}]}}, ["not valid base64"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                           "data": [17]}]}}, ["must be a base64 string"]),
    ({"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1]}]}},
     ["neither 'data' nor parameters.binary_data_size"]),
    ({"json": {"inputs": [image_input(b"no image here")]}}, ["IMAGE[0]"]),
    ({"json": {"inputs": [image_input(jpeg("red"))], "outputs": [{"name": "LOGITS"}]}},
     ["unknown output 'LOGITS'", "PROBABILITIES"]),
    ({"json": {"inputs": [image_input(jpeg("red"))], "outputs": [
        {"name": "PROBABILITIES", "parameters": {"classification": 0}}]}}, ["classification"]),
    ({"json": {"inputs": [image_input(jpeg("red"))], "outputs": [
        {"name": "PROBABILITIES", "parameters": {"binary_data": "yes"}}]}}, ["binary_data"]),
    ({"json": {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, CROP, CROP, 4],
                           "data": [0] * (CROP * CROP * 4)}]}},
     [f"expected [N, {CROP}, {CROP}, 3]"]),
    ({"json": {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, CROP, CROP, 3],
                           "data": [300] * (CROP * CROP * 3)}]}}, ["[0, 255]"]),
    ({"json": {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [0, CROP, CROP, 3],
                           "data": []}]}}, ["N >= 1"]),
    ({"json": {"inputs": [{"name": "NORMALIZED", "datatype": "FP32",
                           "shape": [1, 3, CROP, CROP], "data": [40.0] * (3 * CROP * CROP)}]}},
     ["outside [0, 255]", "mean and std"]),
])
async def test_bad_json_requests_answer_400_saying_why(
        http: httpx.AsyncClient, request_kwargs: dict, words: list[str]) -> None:
    assert_oip_error(await http.post(INFER, **request_kwargs), 400, *words)


def _image_header(size: int, shape: list[int] | None = None) -> dict:
    return {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": shape or [1],
                        "parameters": {"binary_data_size": size}}]}


@pytest.mark.parametrize(("case", "words"), [
    ("prefix past the end", ["length prefix says 5000 bytes", "past the end"]),
    ("prefix cut short", ["4-byte length prefix is cut short"]),
    ("header length past the body", ["says the JSON header is", "holds only"]),
    ("header length not a number", [f"{HEADER} must be a whole number"]),
    ("binary_data_size past the end", ["goes past the end of the body"]),
    ("bytes left over", ["bytes after the inputs' binary data"]),
    ("too many elements", ["more than the 1 elements its shape says"]),
    ("numbers of the wrong size", ["needs"]),
    ("NaN floats", ["NaN"]),
])
async def test_bad_binary_requests_answer_400_saying_why(
        http: httpx.AsyncClient, case: str, words: list[str]) -> None:
    image = jpeg("red")
    good = bytes_tensor(image)
    nan = np.full((1, 3, CROP, CROP), np.nan, dtype="<f4").tobytes()
    kwargs = {
        "prefix past the end": binary_request(
            _image_header(len(good)), struct.pack("<I", 5000) + image),
        "prefix cut short": binary_request(_image_header(len(good) + 2, [2]),
                                           good + b"\x01\x00"),
        "header length past the body": binary_request(
            _image_header(len(good)), good, header_length=10 ** 6),
        "header length not a number": {"content": b"{}", "headers": {HEADER: "12abc"}},
        "binary_data_size past the end": binary_request(_image_header(len(good) + 10), good),
        "bytes left over": binary_request(_image_header(len(good)), good + b"extra"),
        "too many elements": binary_request(_image_header(2 * len(good)), good + good),
        "numbers of the wrong size": binary_request(
            {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, CROP, CROP, 3],
                         "parameters": {"binary_data_size": 10}}]}, b"\x00" * 10),
        "NaN floats": binary_request(
            {"inputs": [{"name": "NORMALIZED", "datatype": "FP32", "shape": [1, 3, CROP, CROP],
                         "parameters": {"binary_data_size": len(nan)}}]}, nan),
    }[case]
    assert_oip_error(await http.post(INFER, **kwargs), 400, *words)


async def test_limits_and_unknown_names(http: httpx.AsyncClient) -> None:
    five = [jpeg("red", seed=i) for i in range(5)]
    assert_oip_error(await http.post(INFER, json={"inputs": [image_input(*five)]}), 413,
                     "more than the 4 allowed")
    assert_oip_error(await http.post(INFER, content=b"x" * 200_001), 413, "over the limit")
    assert_oip_error(await http.post("/v2/models/pets/infer", json={}), 404, "pets")
    assert_oip_error(await http.get("/v2/models/pets"), 404, "loaded models")
    assert_oip_error(await http.get("/v2/models/pets/ready"), 404, "pets")
    assert_oip_error(await http.get("/v2/models/colors/versions/7/ready"), 404, "version '7'")
    assert_oip_error(await http.post("/v2/models/colors/versions/7/infer", json={}), 404,
                     "no version '7'")
    assert_oip_error(await http.get(INFER), 405)
    assert_oip_error(await http.get("/v2/nothing"), 404)
    meta = (await http.get("/v2/models/colors")).json()
    version = meta["versions"][0]
    ok = await http.post(f"/v2/models/colors/versions/{version}/infer",
                         json={"inputs": [image_input(png("blue"))]})
    assert ok.status_code == 200 and ok.json()["model_version"] == version
    assert (await http.get(f"/v2/models/colors/versions/{version}/ready")).json() == {
        "name": "colors", "ready": True}
    assert (await http.get("/v2/health/ready")).json() == {"ready": True}
    assert (await http.get("/v2/health/live")).json() == {"live": True}


async def test_overload_unready_and_deadline_keep_their_statuses_in_the_oip_shape() -> None:
    full = errors.response_for(QueueFullError(requested=2, queued=8, capacity=8,
                                              retry_after=3), oip=True)
    assert full.status_code == 429 and full.headers["retry-after"] == "3"
    assert set(json.loads(full.body)) == {"error"}
    starting = errors.response_for(NotReadyError("the service is starting"), oip=True)
    assert starting.status_code == 503 and json.loads(starting.body) == {
        "error": "the service is starting"}
    late = errors.response_for(DeadlineExceededError("too late"), oip=True)
    assert late.status_code == 504 and json.loads(late.body) == {"error": "too late"}


async def test_predict_and_v2_images_share_batches(
        served: tuple[httpx.AsyncClient, object]) -> None:
    http, app = served
    batcher = app.state.registry.get("colors").batcher
    original = batcher.fn
    slow_down(app, "colors", 0.3)
    slowed = batcher.fn
    sizes: list[int] = []

    def recording(items: list) -> object:
        sizes.append(len(items))
        return slowed(items)

    batcher.fn = recording
    pixels = np.zeros((1, CROP, CROP, 3), dtype=np.uint8)
    pixels[..., 2] = 200
    try:
        first = asyncio.create_task(http.post("/predict", files={"file": ("a.jpg", jpeg("red"))}))
        while not sizes:  # the model is busy with the first image: the next three queue
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(
            http.post("/predict", files={"file": ("b.png", png("green"))}),
            http.post(INFER, json={"inputs": [image_input(jpeg("blue"))]}),
            http.post(INFER, json={"inputs": [{"name": "PIXELS", "datatype": "UINT8",
                                               "shape": [1, CROP, CROP, 3],
                                               "data": pixels.ravel().tolist()}]}))
        await first
    finally:
        batcher.fn = original
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[0].json()["results"][0]["predictions"][0]["label"] == "green"
    assert CLASSES[int(np.argmax(answers[1].json()["outputs"][0]["data"]))] == "blue"
    assert sizes[:2] == [1, 3], sizes


async def test_an_unexpected_failure_is_a_500_in_the_oip_shape(
        served: tuple[httpx.AsyncClient, object], monkeypatch: pytest.MonkeyPatch) -> None:
    http, app = served

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("labelling broke")

    monkeypatch.setattr(app.state.registry.get("colors"), "ranked_labels", broken)
    r = await http.post(INFER, json={"inputs": [image_input(jpeg("red"))], "outputs": [
        {"name": "PROBABILITIES", "parameters": {"classification": 1}}]})
    message = assert_oip_error(r, 500, "internal error", r.headers["x-request-id"])
    assert "labelling broke" not in message
