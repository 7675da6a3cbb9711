"""The Open Inference Protocol routes in-process: every bad request is a 400 saying what is
wrong (never a 500), limits and unknown names answer as /predict's do but in the protocol's
`{"error"}` shape, and /predict's and /v2's images share the same batches."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio

from app.api import errors
from app.exceptions import DeadlineExceededError, NotReadyError, QueueFullError
from tests.serving_helpers import CLASSES, CROP, fast_settings, inside, jpeg, png, running_app

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
    ({"json": {"inputs": [image_input(jpeg("red"), shape=[2])]}},
     ["input IMAGE: 1 elements in 'data', its shape [2] says 2"]),
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
    sizes: list[int] = []

    def recording(items: list, real) -> object:
        sizes.append(len(items))
        time.sleep(0.3)  # the model is slow: what arrives meanwhile queues
        return real(items)

    pixels = np.zeros((1, CROP, CROP, 3), dtype=np.uint8)
    pixels[..., 2] = 200
    with inside(app).batches_through("colors", recording):
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
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[0].json()["results"][0]["predictions"][0]["label"] == "green"
    assert CLASSES[int(np.argmax(answers[1].json()["outputs"][0]["data"]))] == "blue"
    assert sizes[:2] == [1, 3], sizes


async def test_an_unexpected_failure_is_a_500_in_the_oip_shape(
        served: tuple[httpx.AsyncClient, object], monkeypatch: pytest.MonkeyPatch) -> None:
    http, app = served

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("labelling broke")

    monkeypatch.setattr(inside(app).model("colors"), "ranked", broken)
    r = await http.post(INFER, json={"inputs": [image_input(jpeg("red"))], "outputs": [
        {"name": "PROBABILITIES", "parameters": {"classification": 1}}]})
    message = assert_oip_error(r, 500, "internal error", r.headers["x-request-id"])
    assert "labelling broke" not in message


def pixels_request(**changes: object) -> dict:
    """A valid PIXELS request (one black crop, flat data), with `changes` to its input."""
    tensor = {"name": "PIXELS", "datatype": "UINT8", "shape": [1, CROP, CROP, 3],
              "data": [0] * (CROP * CROP * 3)}
    return {"inputs": [{**tensor, **changes}]}


def normalized_request(first: str) -> bytes:
    """A NORMALIZED request whose first number is written as `first` (raw JSON text)."""
    rest = ", ".join(["0.0"] * (3 * CROP * CROP - 1))
    return (f'{{"inputs": [{{"name": "NORMALIZED", "datatype": "FP32", "shape": [1, 3, {CROP}, '
            f'{CROP}], "data": [{first}, {rest}]}}]}}').encode()


def ragged_crops() -> list:
    """One crop, nested as [1, H, W, 3], whose sixth row is a pixel short."""
    crops = np.zeros((1, CROP, CROP, 3), dtype=int).tolist()
    crops[0][5] = crops[0][5][:-1]
    return crops


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("request_kwargs", "words"), [
    ({"content": normalized_request("1" + "0" * 400)}, ["outside FP32's range"]),
    ({"content": normalized_request("1e400")}, ["NaN or infinite"]),
    ({"content": normalized_request("NaN")}, ["NaN or infinite"]),
    ({"content": normalized_request("-Infinity")}, ["NaN or infinite"]),
    ({"content": normalized_request("1e300")}, ["outside FP32's range"]),
    ({"content": b"{}", "headers": {HEADER: "1" * 5000}}, [f"{HEADER} must be a whole number"]),
    ({"json": pixels_request(shape=[1, 2**62, 0, 3], data=[])}, ["shape", "less than"]),
    ({"json": pixels_request(shape=[1, 10**400, 0, 3], data=[])}, ["shape", "less than"]),
    ({"json": pixels_request(data=[10**400] + [0] * (CROP * CROP * 3 - 1))}, ["[0, 255]"]),
    ({"json": pixels_request(data=[-1] + [0] * (CROP * CROP * 3 - 1))}, ["[0, 255]"]),
    ({"content": b'{"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1'
                 + b"0" * 5000 + b', 3, 3], "data": []}]}'}, ["not valid JSON", "out of range"]),
])
async def test_huge_numbers_answer_400_saying_why_without_an_error_log(
        http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, request_kwargs: dict,
        words: list[str]) -> None:
    message = assert_oip_error(await http.post(INFER, **request_kwargs), 400, *words)
    assert len(message) < 300, message
    assert error_records(caplog) == []


NASTY_VALUES: list[object] = [
    10**400, -(10**400), 2**62, -1, 0, 1e308, -1e308, 1.5, True, None, "x" * 8000, "",
    [], [[1, [2]]], {"a": 1}, [10**400] * 3]
NASTY_TEXT = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 4000]


def mutations() -> list[tuple[str, dict]]:
    """A valid IMAGE request with one value swapped for a nasty one, at every place; and a
    body with each of a few nasty header lengths."""
    paths: list[tuple[object, ...]] = [
        ("id",), ("parameters", "binary_data_output"), ("inputs", 0, "name"),
        ("inputs", 0, "datatype"), ("inputs", 0, "shape"), ("inputs", 0, "shape", 0),
        ("inputs", 0, "data"), ("inputs", 0, "data", 0), ("inputs", 0, "parameters"),
        ("inputs", 0, "parameters", "binary_data_size"), ("outputs", 0, "name"),
        ("outputs", 0, "parameters", "classification"),
        ("outputs", 0, "parameters", "binary_data")]
    cases = []
    for path in paths:
        for index, value in enumerate([*NASTY_VALUES, *NASTY_TEXT]):
            body = {"id": "r", "parameters": {}, "outputs": [
                {"name": "PROBABILITIES", "parameters": {"classification": 1}}],
                "inputs": [{**image_input(jpeg("red")), "parameters": {}}]}
            place = body
            for key in path[:-1]:
                place = place[key]  # type: ignore[index]
            raw = index >= len(NASTY_VALUES)  # written into the JSON text as it is
            place[path[-1]] = f"@@{index}@@" if raw else value  # type: ignore[index]
            text = json.dumps(body).replace(f'"@@{index}@@"', str(value))
            cases.append((f"{'.'.join(map(str, path))}={str(value)[:20]}",
                          {"content": text.encode()}))
    for length in ["1" * 5000, "-1", "1e3", "0x10", "\u0663", "", " ", "99999999999999999999",
                   "NaN", str(2**64)]:
        cases.append((f"{HEADER}={length[:20]}", {"content": b"{}",
                                                   "headers": {HEADER: length.encode()}}))
    return cases


async def test_malformed_variants_never_answer_5xx_nor_log_an_error(
        http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    seen: dict[int, int] = {}
    for label, kwargs in mutations():
        r = await http.post(INFER, **kwargs)
        assert r.status_code < 500, (label, r.text)
        assert len(r.text) < 1000, (label, r.text[:200])
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert error_records(caplog) == []
    assert seen.get(400, 0) > 100 and seen.get(200, 0) >= 1, seen  # some stay valid


@pytest.mark.parametrize(("body", "words"), [
    (pixels_request(data=ragged_crops()), ["ragged"]),
    (pixels_request(shape=[2, CROP, CROP, 3], data=[np.zeros((CROP, CROP, 3), int).tolist(),
                                                    np.zeros((CROP, CROP, 2), int).tolist()]),
     ["ragged"]),
    (pixels_request(data=np.zeros((1, CROP, CROP, 3), int).tolist()[0]),
     [f"nested with {CROP} rows at its top", "says 1"]),
    (pixels_request(data=[True] * (CROP * CROP * 3)), ["whole numbers", "true/false"]),
    (pixels_request(data=[False] + [0] * (CROP * CROP * 3 - 1)), ["true/false"]),
    (pixels_request(data=[None] + [0] * (CROP * CROP * 3 - 1)), ["null"]),
    (pixels_request(data=[0.5] + [0] * (CROP * CROP * 3 - 1)), ["fraction"]),
    (pixels_request(data="no list"), ["1 elements in 'data'", "says"]),
    (pixels_request(shape=[1, 224, 224, 3], data="never read"),
     [f"shape [1, 224, 224, 3], expected [N, {CROP}, {CROP}, 3]"]),
    (pixels_request(name="NORMALIZED", datatype="FP32", shape=[1, 3, CROP, CROP],
                    data=[[[[0.0] * CROP] * CROP] * 2 + [[[0.0] * CROP] * (CROP - 1)]]),
     ["ragged"]),
    ({"inputs": [image_input(jpeg("red"))],
      "outputs": [{"name": "PROBABILITIES"}] * 64}, ["PROBABILITIES is requested 64 times"]),
])
async def test_ragged_data_booleans_and_repeated_outputs_answer_400(
        http: httpx.AsyncClient, body: dict, words: list[str]) -> None:
    assert_oip_error(await http.post(INFER, json=body), 400, *words)


async def test_nested_data_as_the_shape_says_is_taken(http: httpx.AsyncClient) -> None:
    pixels = np.zeros((2, CROP, CROP, 3), dtype=np.uint8)
    pixels[0, ..., 0] = pixels[1, ..., 1] = 220
    answers = [await http.post(INFER, json=pixels_request(shape=[2, CROP, CROP, 3], data=data))
               for data in (pixels.tolist(), pixels.ravel().tolist())]
    for r in answers:
        assert r.status_code == 200, r.text
        probs = np.array(r.json()["outputs"][0]["data"]).reshape(2, 3)
        assert [CLASSES[i] for i in probs.argmax(1)] == ["red", "green"]


async def test_an_unknown_model_name_is_cut_in_the_answer(http: httpx.AsyncClient) -> None:
    name = "m" * 8000
    for method, path in [("POST", f"/v2/models/{name}/infer"), ("GET", f"/v2/models/{name}"),
                         ("GET", f"/v2/models/{name}/ready"),
                         ("GET", f"/v2/models/{name}/versions/1/ready")]:
        r = await http.request(method, path, json={})
        message = assert_oip_error(r, 404, "unknown model", "8000 characters")
        assert len(message) < 200, message
