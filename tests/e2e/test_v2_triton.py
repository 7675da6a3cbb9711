"""The Open Inference Protocol through NVIDIA's own client (tritonclient.http) against a real
server process: health, metadata, BYTES images and tensors in binary and JSON modes, the
classification extension, concurrent async inference sharing batches, errors it surfaces."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from models.card import Preprocessing
from models.decoding import decode
from models.preprocessing import Normalize, eval_transform
from tests.server_process import serving
from tests.serving_helpers import CLASSES, CROP, color_image, encode, metric

pytestmark = pytest.mark.slow
FORMATS = {"JPEG": {"quality": 92}, "PNG": {}, "WEBP": {"quality": 90}, "GIF": {},
           "BMP": {}, "TIFF": {}}
PRE = Preprocessing(resize=CROP, crop=CROP)  # the fixture checkpoints' preprocessing


@pytest.fixture(scope="module")
def server(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m app` serving `colors` and `tags` (both loaded); yields host:port."""
    log_path = tmp_path_factory.mktemp("v2") / "server.log"
    with serving(checkpoint_root, log_path, "--default-model", "colors", "--max-batch-size",
                 "8", "--max-wait-ms", "20", "--max-images-per-request", "16",
                 "--torch-threads", "1", env={"RESNET_SERVE_MAX_QUEUE": "128"}) as url:
        yield url.removeprefix("http://")


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server, concurrency=16) as tc:
        yield tc


def predict_scores(server: str, files: list[tuple[str, bytes]], model: str = "colors"
                   ) -> np.ndarray:
    """/predict's scores of every label, one row per file, in class order."""
    r = httpx.post(f"http://{server}/predict", params={"model": model, "all_scores": "true"},
                   files=[("file", f) for f in files], timeout=30)
    assert r.status_code == 200, r.text
    return np.array([[res["scores"][c] for c in CLASSES] for res in r.json()["results"]])


def bytes_input(images: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
    # JSON carries BYTES as text: the images go base64-encoded (raw bytes are not UTF-8)
    values = images if binary else [base64.b64encode(i) for i in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def crops(images: list[bytes]) -> np.ndarray:
    """What the eval transform makes of each image: uint8 [N, H, W, 3]."""
    transform = eval_transform(PRE)
    return np.stack([transform(decode(i, max_pixels=10**8)).permute(1, 2, 0).numpy()
                     for i in images])


def parse_class(entry: bytes | str) -> tuple[float, int, str]:
    """One classification element "score:index:label" (bytes in binary, text in JSON)."""
    score, index, label = (entry.decode() if isinstance(entry, bytes) else entry).split(":", 2)
    return float(score), int(index), label


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("colors") and client.is_model_ready("tags")
    assert not client.is_model_ready("pets")
    server = client.get_server_metadata()
    assert server["name"] == "resnet-serve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata("colors")
    version = meta["versions"][0]
    assert len(meta["versions"]) == 1 and len(version) == 12
    assert client.is_model_ready("colors", model_version=version)
    assert not client.is_model_ready("colors", model_version="0" * 12)
    assert client.get_model_metadata("colors", model_version=version)["name"] == "colors"
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]}
    assert inputs == {"IMAGE": ("BYTES", [-1]), "PIXELS": ("UINT8", [-1, CROP, CROP, 3]),
                      "NORMALIZED": ("FP32", [-1, 3, CROP, CROP])}
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("PROBABILITIES", "FP32", [-1, len(CLASSES)])]
    assert meta["parameters"]["classes"] == CLASSES
    assert meta["parameters"]["preprocessing"]["mean"] == list(PRE.mean)
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("pets")
    assert unknown.value.status() == "404" and "pets" in unknown.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_images_of_every_format_match_predict(
        server: str, client: triton.InferenceServerClient, binary: bool) -> None:
    names = [(fmt, CLASSES[i % 3]) for i, fmt in enumerate(FORMATS)]
    images = [encode(color_image(name, seed=i), fmt, **FORMATS[fmt])
              for i, (fmt, name) in enumerate(names)]
    result = client.infer("colors", [bytes_input(images, binary=binary)], outputs=[
        triton.InferRequestedOutput("PROBABILITIES", binary_data=binary)])
    probs = result.as_numpy("PROBABILITIES")
    assert probs.dtype == np.float32 and probs.shape == (len(images), len(CLASSES))
    assert [CLASSES[i] for i in probs.argmax(1)] == [name for _, name in names]
    expected = predict_scores(server, [(f"{i}.{fmt.lower()}", img) for i, (img, (fmt, _))
                                       in enumerate(zip(images, names, strict=True))])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert result.get_response()["model_version"] == \
        client.get_model_metadata("colors")["versions"][0]


def test_json_mode_sends_raw_image_bytes_nowhere(client: triton.InferenceServerClient) -> None:
    """tritonclient's JSON mode refuses bytes that are not UTF-8, as every image is: in JSON
    the images go as base64 text (the test above), which the server decodes."""
    tensor = triton.InferInput("IMAGE", [1], "BYTES")
    raw = encode(color_image("red"), "PNG")
    with pytest.raises(InferenceServerException, match="UTF-8"):
        tensor.set_data_from_numpy(np.array([raw], dtype=np.object_), binary_data=False)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_and_fp32_tensors_match_predict(
        server: str, client: triton.InferenceServerClient, binary: bool) -> None:
    images = [encode(color_image(name, seed=20 + i), "PNG") for i, name in enumerate(CLASSES)]
    expected = predict_scores(server, [(f"{i}.png", img) for i, img in enumerate(images)])
    pixels = crops(images)
    normalized = Normalize(PRE)(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    for name, datatype, data in (("PIXELS", "UINT8", pixels),
                                 ("NORMALIZED", "FP32", normalized.astype(np.float32))):
        tensor = triton.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data, binary_data=binary)
        result = client.infer("colors", [tensor], outputs=[
            triton.InferRequestedOutput("PROBABILITIES", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), expected, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_extension(server: str, client: triton.InferenceServerClient,
                                  binary: bool) -> None:
    images = [encode(color_image(name, seed=40 + i), "JPEG", quality=92)
              for i, name in enumerate(CLASSES)]
    result = client.infer("colors", [bytes_input(images, binary=True)], outputs=[
        triton.InferRequestedOutput("PROBABILITIES", binary_data=binary, class_count=2)])
    rows = result.as_numpy("PROBABILITIES")
    assert rows.shape == (3, 2)
    expected = predict_scores(server, [(f"{i}.jpg", img) for i, img in enumerate(images)])
    for row, want, name in zip(rows, expected, CLASSES, strict=True):
        parsed = [parse_class(entry) for entry in row]
        assert parsed[0][2] == name and parsed[0][1] == CLASSES.index(name)
        order = np.argsort(-want)[:2]
        assert [p[1] for p in parsed] == order.tolist()
        np.testing.assert_allclose([p[0] for p in parsed], want[order], atol=1e-6)


def test_classification_of_a_multi_label_model_returns_labels_past_thresholds(
        server: str, client: triton.InferenceServerClient) -> None:
    images = [encode(color_image(name, seed=60 + i), "PNG") for i, name in enumerate(CLASSES)]
    result = client.infer("tags", [bytes_input(images, binary=True)], outputs=[
        triton.InferRequestedOutput("PROBABILITIES", class_count=3)])
    r = httpx.post(f"http://{server}/predict", params={"model": "tags"},
                   files=[("file", (f"{i}.png", img)) for i, img in enumerate(images)])
    expected = [[p["label"] for p in res["predictions"]] for res in r.json()["results"]]
    got = [[parse_class(e)[2] for e in row if e] for row in result.as_numpy("PROBABILITIES")]
    assert got == expected and all(expected)
    full = client.infer("tags", [bytes_input(images, binary=True)]).as_numpy("PROBABILITIES")
    assert full.shape == (3, 3) and not np.allclose(full.sum(1), 1.0)  # sigmoid per class


CALLERS = 8  # client threads, each with its own connection


def test_concurrent_callers_share_batches(server: str) -> None:
    """Eight tritonclient callers on threads of their own, four single-image requests each.

    tritonclient's `async_infer` runs its greenlets on the calling thread, and on a fast
    machine it sent one request after another's answer; threads are truly concurrent."""
    def batches() -> tuple[float, float]:
        text = httpx.get(f"http://{server}/metrics").text
        return (metric(text, "resnet_serve_batch_size_count", model="colors"),
                metric(text, "resnet_serve_batch_size_sum", model="colors"))

    images = [encode(color_image(CLASSES[i % 3], seed=80 + i), "JPEG") for i in range(32)]
    start = threading.Barrier(CALLERS)

    def caller(k: int) -> list[tuple[int, str]]:
        with triton.InferenceServerClient(server) as tc:
            start.wait(timeout=30)
            answers = [tc.infer("colors", [bytes_input([images[i]], binary=True)])
                       for i in range(k, len(images), CALLERS)]
        return [(i, CLASSES[int(a.as_numpy("PROBABILITIES").argmax())])
                for i, a in zip(range(k, len(images), CALLERS), answers, strict=True)]

    before = batches()
    with ThreadPoolExecutor(CALLERS) as pool:
        labels = dict(pair for part in pool.map(caller, range(CALLERS)) for pair in part)
    after = batches()
    assert [labels[i] for i in range(32)] == [CLASSES[i % 3] for i in range(32)]
    ran, images_run = after[0] - before[0], after[1] - before[1]
    assert images_run == 32  # every image ran once
    assert ran < 32, f"{ran} batches for 32 single-image requests: none shared a batch"


def test_errors_reach_the_client_with_their_message(client: triton.InferenceServerClient
                                                    ) -> None:
    wrong_type = triton.InferInput("IMAGE", [1], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    wrong_shape = triton.InferInput("PIXELS", [1, CROP, CROP, 4], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, CROP, CROP, 4), dtype=np.uint8))
    image = bytes_input([encode(color_image("red"), "PNG")], binary=True)
    cases = [([wrong_type], None, "must be BYTES"), ([wrong_shape], None, "shape"),
             ([image], [triton.InferRequestedOutput("LOGITS")], "unknown output 'LOGITS'"),
             ([bytes_input([b"not an image"], binary=True)], None, "IMAGE[0]")]
    for inputs, outputs, message in cases:
        with pytest.raises(InferenceServerException) as failed:
            client.infer("colors", inputs, outputs=outputs)
        assert failed.value.status() == "400" and message in failed.value.message()
