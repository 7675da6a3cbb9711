"""The decode processes of the real server: what one image costs is bounded and stopped.

The server process, its forkserver and its decode processes (named `resnet-decode`) are
found through /proc, so what they spend is measured from outside, as an operator would.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.imagegen import (
    many_scans_jpeg,
    progressive_frame_bomb,
    rgba_png_within_budget,
    tiff_tile_bomb,
)
from tests.server_process import serving
from tests.serving_helpers import jpeg

pytestmark = pytest.mark.slow

TIMEOUT = 0.5  # the server's request timeout
SLOW_SIDE = 10_000  # a flat RGBA PNG this wide: 400 kB, and 2 s of decoding on the 2-core
SLOW_PIXELS = SLOW_SIDE ** 2  # machine (PNG inflates 400 MB of pixels: never under 0.5 s)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _decoders(root: int) -> list[int]:
    return [pid for pid in _tree(root)
            if Path(f"/proc/{pid}/comm").exists()
            and Path(f"/proc/{pid}/comm").read_text().strip() == "resnet-decode"]


def _server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"app" in cmd and port.encode() in cmd and b"--port" in cmd:
                return int(entry.name)
    raise AssertionError("server process not found")


@pytest.fixture(scope="module")
def server(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, int]]:
    log = tmp_path_factory.mktemp("box") / "server.log"
    with serving(checkpoint_root, log, "--request-timeout", str(TIMEOUT),
                 "--decode-workers", "1", "--decode-memory-mb", "2048",
                 "--max-pixels", str(SLOW_PIXELS),
                 env={"RESNET_SERVE_TORCH_THREADS": "1"}) as url:
        yield url, _server_pid(url)


def _post(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/predict?model=colors", files={"file": (name, data)}, timeout=30)


@pytest.fixture(scope="module")
def slow_image() -> bytes:
    """An image within every limit of the server whose decoding takes over its timeout."""
    return rgba_png_within_budget(SLOW_SIDE, SLOW_SIDE)


def test_a_decode_past_the_deadline_is_504_and_then_costs_nothing(server, slow_image) -> None:
    url, pid = server
    r = _post(url, "slow.png", slow_image)
    assert r.status_code == 504, r.text
    time.sleep(0.2)  # the kill and the replacement's start
    spent = _cpu(_tree(pid))
    time.sleep(1.0)
    assert _cpu(_tree(pid)) - spent < 0.25  # nothing of it is still being decoded
    ok = _post(url, "after.jpg", jpeg("red"))
    assert ok.status_code == 200 and ok.json()["results"][0]["predictions"][0]["label"] == "red"


def test_a_crashed_decoder_costs_one_image_a_400(server, slow_image) -> None:
    url, pid = server
    slow = slow_image
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(_post(url, "crash.png", slow)))
    [decoder] = _decoders(pid)
    spent = _cpu([decoder])
    thread.start()
    give_up = time.monotonic() + 10
    while _cpu([decoder]) - spent < 0.05 and time.monotonic() < give_up:
        time.sleep(0.01)  # until it is decoding
    os.kill(decoder, signal.SIGSEGV)
    thread.join(30)
    [r] = answer
    assert r.status_code == 400, r.text
    assert "crash.png" in r.json()["detail"] and "crashed" in r.json()["detail"]
    assert _post(url, "after.jpg", jpeg("blue")).status_code == 200
    assert len(_decoders(pid)) == 1 and _decoders(pid) != [decoder]


@pytest.mark.parametrize("name, data, says", [
    ("frame.jpg", progressive_frame_bomb(), "13000x13000"),
    ("scans.jpg", many_scans_jpeg(3000), "scans"),
    ("tile.tif", tiff_tile_bomb(), "tile"),
])
def test_small_bombs_are_refused_before_decoding(server, name: str, data: bytes,
                                                 says: str) -> None:
    url, pid = server
    spent = _cpu(_tree(pid))
    r = _post(url, name, data)
    assert r.status_code == 413, r.text
    assert name in r.json()["detail"] and says in r.json()["detail"]
    assert _cpu(_tree(pid)) - spent < 0.3
