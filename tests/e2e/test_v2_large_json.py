"""Large Open Inference Protocol JSON bodies against a real server process: while several
parse at once, flat and nested, every other route still answers at once (/health under half
a second), and each of them is answered correctly."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_process import serving
from tests.serving_helpers import CLASSES, CROP

pytestmark = pytest.mark.slow
IMAGES = 128  # per body: 393,216 numbers, 1.7 MB flat and 2 MB nested
COLORS = {"red": 0, "green": 1, "blue": 2}
HEALTH_LIMIT = 0.5


@pytest.fixture(scope="module")
def server(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, Path]]:
    """`python -m app` taking up to IMAGES images per request; yields its URL and log."""
    log_path = tmp_path_factory.mktemp("v2-json") / "server.log"
    with serving(checkpoint_root, log_path, "--default-model", "colors",
                 "--max-images-per-request", str(IMAGES), "--max-queue", str(4 * IMAGES),
                 "--max-batch-size", "64", "--torch-threads", "1") as url:
        yield url, log_path


def pixels_body(color: str, *, nested: bool) -> bytes:
    """IMAGES crops of one colour as a PIXELS tensor of JSON numbers."""
    pixels = np.full((IMAGES, CROP, CROP, 3), 30, dtype=np.uint8)
    pixels[..., COLORS[color]] = 220
    data = pixels.tolist() if nested else pixels.ravel().tolist()
    return json.dumps({"inputs": [{"name": "PIXELS", "datatype": "UINT8",
                                   "shape": list(pixels.shape), "data": data}]}).encode()


def test_health_answers_at_once_while_large_json_bodies_parse(
        server: tuple[str, Path]) -> None:
    url, log_path = server
    bodies = [(color, pixels_body(color, nested=nested))
              for color, nested in [("red", False), ("green", True), ("blue", False),
                                    ("red", True)]]
    latencies: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                start = time.perf_counter()
                assert client.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

    def infer(body: bytes) -> httpx.Response:
        return httpx.post(f"{url}/v2/models/colors/infer", content=body, timeout=60,
                          headers={"content-type": "application/json"})

    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        poller = pool.submit(poll_health)
        time.sleep(0.1)
        try:
            answers = list(pool.map(infer, [body for _, body in bodies]))
        finally:
            done.set()
        poller.result()
    for (color, _), r in zip(bodies, answers, strict=True):
        assert r.status_code == 200, r.text[:300]
        [out] = r.json()["outputs"]
        probs = np.array(out["data"]).reshape(out["shape"])
        assert out["shape"] == [IMAGES, len(CLASSES)]
        assert {CLASSES[i] for i in probs.argmax(1)} == {color}
    assert len(latencies) >= 5, latencies
    assert max(latencies) < HEALTH_LIMIT, (
        f"/health took up to {max(latencies):.2f} s while the bodies parsed")
    assert " ERROR " not in log_path.read_text()
