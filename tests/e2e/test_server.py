"""The real server process: `python -m app` on a loopback port, real files, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server_process import ROOT, free_port
from tests.serving_helpers import CLASSES, jpeg, png

pytestmark = pytest.mark.slow


@pytest.fixture
def server(checkpoint_root: Path, tmp_path: Path):
    """A running server process and its base URL; stopped (killed if need be) afterwards."""
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    env = {**os.environ, "RESNET_SERVE_MAX_QUEUE": "128", "RESNET_SERVE_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--checkpoint-dir", str(checkpoint_root),
         "--default-model", "colors", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu", "--max-batch-size", "8", "--max-images-per-request", "16",
         "--log-format", "json", "--shutdown-timeout", "10"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > give_up:
            log.seek(0)
            proc.kill()
            pytest.fail(f"server did not become ready:\n{log.read()}")
        time.sleep(0.2)
    yield proc, url, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_real_server_answers_and_stops_cleanly(server) -> None:
    proc, url, log = server
    with httpx.Client(base_url=url, timeout=30) as http:
        files = [("file", ("r.jpg", jpeg("red", seed=1), "image/jpeg")),
                 ("file", ("g.png", png("green", seed=2), "image/png")),
                 ("file", ("b.jpg", jpeg("blue", seed=3), "image/jpeg"))]
        r = http.post("/predict", files=files, params={"top_k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "colors"
        assert [res["predictions"][0]["label"] for res in body["results"]] == CLASSES
        raw = http.post("/predict", content=png("blue"), headers={"Content-Type": "image/png"})
        assert raw.json()["results"][0]["predictions"][0]["label"] == "blue"
        bad = http.post("/predict", files={"file": ("x.jpg", b"nope")})
        assert bad.status_code == 400 and "x.jpg" in bad.json()["detail"]
        assert bad.headers["x-request-id"] == bad.json()["request_id"]
        assert http.get("/models").json()["default"] == "colors"
        assert "resnet_serve_batch_size_bucket" in http.get("/metrics").text
        proc.send_signal(signal.SIGHUP)  # rescan: nothing changed, still serving
        give_up = time.monotonic() + 10
        while "resnet_serve_reloads_total 2.0" not in http.get("/metrics").text:
            assert time.monotonic() < give_up, "SIGHUP did not trigger a rescan"
            time.sleep(0.1)
        assert http.get("/ready").status_code == 200

    async def in_flight_then_sigterm() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            many = [("file", (f"{i}.jpg", jpeg(CLASSES[i % 3], seed=i))) for i in range(16)]
            tasks = [asyncio.create_task(client.post("/predict", files=many))
                     for _ in range(6)]
            await asyncio.sleep(0.15)
            proc.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*tasks)
            for r in responses:
                labels = [res["predictions"][0]["label"] for res in r.json()["results"]]
                assert labels == [CLASSES[i % 3] for i in range(16)]
            return [r.status_code for r in responses]

    assert asyncio.run(in_flight_then_sigterm()) == [200] * 6
    assert proc.wait(timeout=20) == 0
    log.seek(0)
    lines = [json.loads(line) for line in log.read().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert any(m == "stopped" for m in messages), messages[-5:]
    assert not any("Traceback" in entry.get("exception", "") for entry in lines)
    assert any(entry["request_id"] == bad.headers["x-request-id"] for entry in lines)
