"""Soak and overload: a bounded run against a real server process it starts itself.

    python -m bench.soak --requests 10000 --reloads 50 --flood-seconds 20

Loopback only; every loop is bounded in count and time. Reports, as JSON: requests sent,
accepted, refused (429), failed (5xx, must be 0), p50/p99 of accepted requests at 1x and 4x
capacity, latency at concurrency 1 before and after the flood, and the server's RSS before
and after N requests and after M reloads.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
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
from models.architectures import build
from models.checkpoint import ModelCard, Preprocessing, save

logger = logging.getLogger(__name__)


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
                "p99_ms": round(1000 * percentile(self.latencies, 99), 1)}


async def one(client: httpx.AsyncClient, body: bytes, counts: Counts) -> None:
    """Send one request and count its outcome."""
    counts.sent += 1
    start = time.perf_counter()
    try:
        r = await client.post("/predict", content=body, headers={"Content-Type": "image/jpeg"})
    except httpx.HTTPError:
        counts.transport += 1
        return
    if r.status_code == 200:
        counts.ok += 1
        counts.latencies.append(time.perf_counter() - start)
    elif r.status_code == 429:
        counts.refused += 1
    elif r.status_code >= 500:
        counts.failed += 1
    else:
        counts.other += 1


async def closed_loop(client: httpx.AsyncClient, images: list[bytes], concurrency: int,
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


async def open_loop(client: httpx.AsyncClient, images: list[bytes], rate: float,
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
    images = jpegs()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout + 30, limits=limits) as c:
        await closed_loop(c, images, 4, 200, 30)  # warm
        before = (await closed_loop(c, images, 1, 100, 30)).summary()
        probe = await closed_loop(c, images, 16, 100_000, args.probe_seconds)
        capacity = probe.ok / args.probe_seconds
        logger.info("capacity about %.1f req/s", capacity)
        at_1x = (await open_loop(c, images, capacity, args.flood_seconds)).summary()
        at_4x = (await open_loop(c, images, 4 * capacity, args.flood_seconds)).summary()
        await asyncio.sleep(2)
        after = (await closed_loop(c, images, 1, 100, 30)).summary()
        rss0 = rss_mib(pid)
        many = (await closed_loop(c, images, 16, args.requests, args.soak_seconds)).summary()
        rss1 = rss_mib(pid)
        reloads = failed_reloads = 0
        for _ in range(args.reloads):
            (ckpt / "card.json").touch()
            r = await c.post("/models/reload")
            reloads += 1
            failed_reloads += r.status_code != 200
        await closed_loop(c, images, 4, 100, 30)
        rss2 = rss_mib(pid)
    return {
        "capacity_req_per_s": round(capacity, 1),
        "latency_c1_before_flood": before, "latency_c1_after_flood": after,
        "load_1x": at_1x, "load_4x": at_4x,
        "requests": many, "rss_mib_before_requests": round(rss0, 1),
        "rss_mib_after_requests": round(rss1, 1),
        "reloads": reloads, "failed_reloads": failed_reloads,
        "rss_mib_after_reloads": round(rss2, 1),
    }


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
        [sys.executable, "-m", "app", "--checkpoint-dir", str(root), "--port", str(port),
         "--request-timeout", str(args.timeout), "--max-queue", str(args.max_queue),
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
    result["settings"] = {"arch": args.arch, "crop": args.crop, "timeout_s": args.timeout,
                          "max_queue": args.max_queue}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
