"""The real server process at the socket level: early 413, disconnects, keys, SIGTERM.

The server runs a deliberately slow checkpoint (random weights at 160 px, one image per
batch) so that work is reliably still queued when the test acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import torch

from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.checkpoint import save
from tests.server_process import ROOT, free_port
from tests.serving_helpers import CLASSES, jpeg, metric

pytestmark = pytest.mark.slow

KEY = "e2e-" + uuid.uuid4().hex
AUTH = {"X-API-Key": KEY}
SHUTDOWN_TIMEOUT = 10


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """A server over one slow model, with an API key; killed afterwards if still running."""
    root = tmp_path_factory.mktemp("slow-ckpt")
    torch.manual_seed(0)
    save(root / "slow", build("resnet18", num_classes=3), ModelCard(
        name="slow", arch="resnet18", task="single_label", classes=CLASSES,
        preprocessing=Preprocessing(resize=160, crop=160)))
    port = free_port()
    log_path = root / "server.log"
    log = log_path.open("w")
    env = {**os.environ, "RESNET_SERVE_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--checkpoint-dir", str(root), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--max-batch-size", "1", "--max-wait-ms", "0",
         "--max-queue", "64", "--max-images-per-request", "16", "--api-key", KEY,
         "--max-upload-bytes", "1000000", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
         "--log-level", "debug"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 90
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            pytest.fail(f"server did not become ready:\n{log_path.read_text()}")
        time.sleep(0.2)
    yield proc, url, port, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def raw_head(port: int, lines: list[str]) -> socket.socket:
    """Open a connection and send only a request head (no body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """Read until the end of a response head (and what follows in the same packets)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def multipart(files: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    """A multipart/form-data body with every file in the field `file`."""
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
              f"filename=\"{name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
             for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def scrape(url: str) -> str:
    """The /metrics text."""
    return httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text


def test_huge_content_length_is_refused_before_the_body(slow_server) -> None:
    _proc, url, port, _log = slow_server
    for ctype in ("image/jpeg", "multipart/form-data; boundary=x"):
        sock = raw_head(port, ["POST /predict HTTP/1.1", "Host: test",
                               f"Content-Type: {ctype}", f"X-API-Key: {KEY}",
                               f"Content-Length: {10**12}"])
        with sock:
            began = time.monotonic()
            status, data = read_status(sock)  # not one body byte was sent
            assert status == 413, data
            assert time.monotonic() - began < 5
    assert httpx.get(f"{url}/ready").status_code == 200


def test_client_that_disconnects_has_its_queued_work_dropped(slow_server) -> None:
    _proc, url, port, _log = slow_server
    before = scrape(url)
    ran_before = metric(before, "resnet_serve_images_total", model="slow")
    body = multipart([(f"{i}.jpg", jpeg(CLASSES[i % 3], seed=i, size=(200, 200)))
                      for i in range(16)])
    sock = raw_head(port, ["POST /predict HTTP/1.1", "Host: test", f"X-API-Key: {KEY}",
                           "Content-Type: multipart/form-data; boundary=b0undary",
                           f"Content-Length: {len(body)}"])
    sock.sendall(body)
    give_up = time.monotonic() + 20
    while metric(scrape(url), "resnet_serve_queue_depth", model="slow") < 4:
        assert time.monotonic() < give_up, "the request never queued"
        time.sleep(0.01)
    sock.close()  # gone while its images wait
    give_up = time.monotonic() + 10
    while True:  # until every image is accounted for: run (the batch at close) or dropped
        text = scrape(url)
        dropped = metric(text, "resnet_serve_images_dropped_total", model="slow",
                         reason="disconnected")
        ran = metric(text, "resnet_serve_images_total", model="slow") - ran_before
        if ran + dropped == 16:
            break
        assert time.monotonic() < give_up, f"disconnected work not dropped: {ran}, {dropped}"
        time.sleep(0.05)
    assert dropped > 0 and ran < 16, (ran, dropped)
    assert metric(text, "resnet_serve_queue_depth", model="slow") == 0
    r = httpx.post(f"{url}/predict", headers=AUTH, files={"file": ("r.jpg", jpeg("red"))})
    assert r.status_code == 200


def test_key_is_required_and_never_logged(slow_server) -> None:
    _proc, url, _port, log_path = slow_server
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/models", headers={"X-API-Key": KEY[:-1]}).status_code == 401
    assert httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}
                     ).status_code == 200
    text = log_path.read_text()
    assert "401" in text and KEY not in text and KEY[:-1] not in text


def test_sigterm_finishes_in_flight_work_and_refuses_new(slow_server) -> None:
    proc, url, _port, log_path = slow_server

    async def scenario() -> tuple[list[httpx.Response], list[object], float]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
            files = [("file", (f"{i}.jpg", jpeg(CLASSES[i % 3], seed=i))) for i in range(6)]
            tasks = [asyncio.create_task(http.post("/predict", files=files)) for _ in range(3)]
            while metric((await http.get("/metrics")).text, "resnet_serve_queue_depth",
                         model="slow") < 6:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            late: list[object] = []
            for _ in range(3):
                await asyncio.sleep(0.05)
                async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=5) as fresh:
                    for path in ("/ready", "/predict"):
                        try:
                            r = await (fresh.get(path) if path == "/ready" else fresh.post(
                                path, files={"file": ("late.jpg", jpeg("red"))}))
                            late.append(r.status_code)
                        except httpx.TransportError as exc:
                            late.append(type(exc).__name__)
            return await asyncio.gather(*tasks), late, signalled

    responses, late, signalled = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 3
    for r in responses:
        assert [x["filename"] for x in r.json()["results"]] == [f"{i}.jpg" for i in range(6)]
    assert all(s in (503, "ConnectError") for s in late), late
    assert proc.wait(timeout=SHUTDOWN_TIMEOUT + 10) == 0
    assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT + 10
    assert "stopped" in log_path.read_text()
