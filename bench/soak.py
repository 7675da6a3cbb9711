"""Soak and overload: a bounded run against a real server process it starts itself.

    python -m bench.soak --requests 10000 --reloads 50 --flood-seconds 20

Loopback only; every loop is bounded in count and time. Reports, as JSON: requests sent,
accepted, refused (429), failed (5xx, must be 0), p50/p99 of accepted requests at 1x and 4x
capacity, latency at concurrency 1 before and after the flood, the server's RSS before and
after N requests and after M reloads, and the requests answered while those reloads ran.
Load goes through `bench.rawhttp` so that the client is not what saturates.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from bench.load import percentile
from bench.rawhttp import RawHttpClient, build_request
from models.architectures import build
from models.card import ModelCard, Preprocessing
from models.checkpoint import save

logger = logging.getLogger(__name__)


CLIENT_CONNECTIONS = 1000  # the load client's pool


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(root: Path, arch: str, crop: int) -> Path:
    """A small random-weight checkpoint: the soak is about robustness, not speed."""
    torch.manual_seed(0)
    classes = [f"class_{i}" for i in range(10)]
    card = ModelCard(name="soak", arch=arch, task="single_label", classes=classes,
                     preprocessing=Preprocessing.for_crop(crop))
    return save(root / "soak", build(arch, num_classes=len(classes)), card)


def jpegs(n: int = 16) -> list[bytes]:
    """Small noisy JPEGs."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        arr = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


class Counts:
    """Outcome counts and accepted latencies for one phase."""

    def __init__(self) -> None:
        self.sent = self.ok = self.refused = self.failed = self.other = self.transport = 0
        self.latencies: list[float] = []

    def summary(self) -> dict:
        return {"sent": self.sent, "accepted": self.ok, "refused_429": self.refused,
                "failed_5xx": self.failed, "other_status": self.other,
                "transport_errors": self.transport,
                "p50_ms": round(1000 * percentile(self.latencies, 50), 1),
                "p99_ms": round(1000 * percentile(self.latencies, 99), 1),
                "max_ms": round(1000 * max(self.latencies, default=float("nan")), 1)}


async def one(client: RawHttpClient, request: bytes, counts: Counts) -> None:
    """Send one request and count its outcome."""
    counts.sent += 1
    start = time.perf_counter()
    try:
        r = await client.send(request)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
        counts.transport += 1
        return
    if r.status == 200:
        counts.ok += 1
        counts.latencies.append(time.perf_counter() - start)
    elif r.status == 429:
        counts.refused += 1
    elif r.status >= 500:
        counts.failed += 1
        if counts.failed <= 3:  # say what they were
            logger.warning("%d: %s", r.status, r.body[:200])
    else:
        counts.other += 1


async def closed_loop(client: RawHttpClient, images: list[bytes], concurrency: int,
                      total: int, seconds: float) -> Counts:
    """`concurrency` clients back to back, until `total` requests or `seconds`."""
    counts, deadline, left = Counts(), time.perf_counter() + seconds, [total]

    async def worker(offset: int) -> None:
        i = offset
        while left[0] > 0 and time.perf_counter() < deadline:
            left[0] -= 1
            await one(client, images[i % len(images)], counts)
            i += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return counts


async def open_loop(client: RawHttpClient, images: list[bytes], rate: float,
                    seconds: float) -> Counts:
    """Offer `rate` requests/s whatever the server does (arrivals do not wait for answers)."""
    counts, tasks = Counts(), []
    start, n = time.perf_counter(), int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, images[i % len(images)], counts)))
    await asyncio.gather(*tasks)
    return counts


async def soak(args: argparse.Namespace, url: str, pid: int, ckpt: Path) -> dict:
    """All phases, in order."""
    port = int(url.rsplit(":", 1)[1])
    requests = [build_request("POST", "/predict", f"127.0.0.1:{port}", body=image,
                              headers={"Content-Type": "image/jpeg"}) for image in jpegs()]
    load = RawHttpClient("127.0.0.1", port, max_connections=CLIENT_CONNECTIONS,
                         timeout=args.timeout + 30)
    try:
        await closed_loop(load, requests, 4, 200, 30)  # warm
        before = (await closed_loop(load, requests, 1, 100, 30)).summary()
        probe = await closed_loop(load, requests, 16, 100_000, args.probe_seconds)
        capacity = probe.ok / args.probe_seconds
        logger.info("capacity about %.1f req/s", capacity)
        at_1x = (await open_loop(load, requests, capacity, args.flood_seconds)).summary()
        at_4x = (await open_loop(load, requests, 4 * capacity, args.flood_seconds)).summary()
        await asyncio.sleep(2)
        after = (await closed_loop(load, requests, 1, 100, 30)).summary()
        rss0 = rss_mib(pid)
        logger.info("%d requests", args.requests)
        many = (await closed_loop(load, requests, 16, args.requests, args.soak_seconds))
        rss1 = rss_mib(pid)
        logger.info("%d reloads under load", args.reloads)
        stop = asyncio.Event()
        during = asyncio.create_task(load_until(load, requests, stop))
        reloads = failed_reloads = 0
        async with httpx.AsyncClient(base_url=url, timeout=120) as control:
            for _ in range(args.reloads):
                (ckpt / "card.json").touch()  # a new version on disk: a real swap each time
                r = await control.post("/models/reload")
                reloads += 1
                failed_reloads += r.status_code != 200 or r.json()["loaded"] != ["soak"]
        stop.set()
        during_reloads = await during
        await closed_loop(load, requests, 4, 100, 30)
        rss2 = rss_mib(pid)
    finally:
        await load.close()
    return {
        "capacity_req_per_s": round(capacity, 1),
        "latency_c1_before_flood": before, "latency_c1_after_flood": after,
        "load_1x": at_1x, "load_4x": at_4x,
        "requests": many.summary(), "rss_mib_before_requests": round(rss0, 1),
        "rss_mib_after_requests": round(rss1, 1),
        "reloads": reloads, "failed_reloads": failed_reloads,
        "requests_during_reloads": during_reloads.summary(),
        "rss_mib_after_reloads": round(rss2, 1),
    }


async def load_until(client: RawHttpClient, requests: list[bytes], stop: asyncio.Event,
                     concurrency: int = 4) -> Counts:
    """Steady closed-loop traffic until `stop` is set."""
    counts = Counts()

    async def worker(offset: int) -> None:
        i = offset
        while not stop.is_set():
            await one(client, requests[i % len(requests)], counts)
            i += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return counts


def main(argv: list[str] | None = None) -> dict:
    """Start a server, run the phases, stop it, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--reloads", type=int, default=50)
    parser.add_argument("--probe-seconds", type=float, default=10)
    parser.add_argument("--flood-seconds", type=float, default=20)
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--timeout", type=float, default=10, help="server request timeout")
    parser.add_argument("--max-queue", type=int, default=128)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    ckpt = make_checkpoint(root, args.arch, args.crop)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--checkpoint-dir", str(root), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu",
         "--request-timeout", str(args.timeout), "--max-queue", str(args.max_queue),
         # above the client's pool: connections left from the flood are the client's own,
         # and its next requests must not meet the cap meant for strangers
         "--max-connections", str(CLIENT_CONNECTIONS + 200),
         "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        result = asyncio.run(soak(args, url, server.pid, ckpt))
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    result["settings"] = {"arch": args.arch, "crop": args.crop, "timeout_s": args.timeout,
                          "max_queue": args.max_queue}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    main()
