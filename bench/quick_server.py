"""Quick throughput check: the real server vs the raw model, measured in one run.

    python -m bench.quick_server --seconds 20 --batch 16 --threads 1

Writes a random-weight resnet34 checkpoint at crop 224 into a temporary folder, times the raw
model (Predictor on uint8 batches) at batch 1 and at `--batch` (before and after the server
phases), then starts `python -m app` on
a free loopback port and drives it with closed-loop clients at concurrency 1 and 16, each
posting one 640x480 JPEG per request. Bounded by --seconds per phase and --max-requests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from models.architectures import build
from models.checkpoint import ModelCard, Preprocessing, save
from models.device import Runtime
from models.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(root: Path) -> Path:
    """A resnet34 with random weights and ImageNet-style preprocessing (224 crop)."""
    torch.manual_seed(0)
    model = build("resnet34", num_classes=10)
    card = ModelCard(name="bench34", arch="resnet34", task="single_label",
                     classes=[f"class{i}" for i in range(10)],
                     preprocessing=Preprocessing(resize=256, crop=224))
    return save(root / "bench34", model, card)


def jpegs(count: int = 8) -> list[bytes]:
    """Smooth random 640x480 photos as JPEG bytes (decode and resize cost like real ones)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((640, 480), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def raw_images_per_second(ckpt: Path, batch: int, seconds: float) -> float:
    """Images/s of Predictor.probabilities on uint8 batches, no HTTP and no decoding."""
    from models.checkpoint import load

    model, card = load(ckpt)
    predictor = Predictor(model, card, Runtime.create("cpu", "fp32"))
    x = torch.randint(0, 255, (batch, 3, 224, 224), dtype=torch.uint8)
    predictor.probabilities(x)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds or done == 0:
        predictor.probabilities(x)
        done += batch
    return done / (time.perf_counter() - began)


def raw_phase(ckpt: Path, batch: int, seconds: float) -> dict[str, float]:
    """Raw images/s at batch 1 and at `batch`."""
    return {"batch_1_images_per_s": round(raw_images_per_second(ckpt, 1, seconds / 2), 2),
            f"batch_{batch}_images_per_s": round(
                raw_images_per_second(ckpt, batch, seconds / 2), 2)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def drive(url: str, images: list[bytes], concurrency: int, seconds: float,
                max_requests: int) -> dict:
    """Closed-loop clients: each posts one image, waits, posts the next."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at and len(latencies) + errors < max_requests:
            began = time.perf_counter()
            r = await http.post("/predict", content=images[i % len(images)],
                                headers={"Content-Type": "image/jpeg"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - began)
            else:
                errors += 1
            i += concurrency

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        before = await batch_totals(http)
        began = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - began
        after = await batch_totals(http)
    batches = after[0] - before[0]
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(lat), "errors": errors,
        "images_per_s": round(len(lat) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "mean_batch": round((after[1] - before[1]) / batches, 2) if batches else None,
    }


async def batch_totals(http: httpx.AsyncClient) -> tuple[float, float]:
    """(batches run, images run) from the server's /metrics."""
    text = (await http.get("/metrics")).text
    count = re.search(r'^resnet_serve_batch_size_count\{model="bench34"\} (\S+)$', text, re.M)
    total = re.search(r'^resnet_serve_batch_size_sum\{model="bench34"\} (\S+)$', text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def main(argv: list[str] | None = None) -> dict:
    """Run every phase and print one JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--batch", type=int, default=16, help="server max batch size")
    parser.add_argument("--max-requests", type=int, default=5000, help="cap per phase")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the raw model and the server (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp))
        summary: dict = {"torch_threads": torch.get_num_threads(),
                         "raw_before": raw_phase(ckpt, args.batch, args.seconds)}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--checkpoint-dir", tmp, "--port", str(port),
             "--device", "cpu", "--max-batch-size", str(args.batch), "--max-queue", "256",
             "--log-level", "warning", "--torch-threads", str(args.threads)], cwd=ROOT)
        try:
            give_up = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > give_up:
                    raise SystemExit("server did not become ready")
                time.sleep(0.5)
            images = jpegs()
            summary["server"] = [
                asyncio.run(drive(url, images, c, args.seconds, args.max_requests))
                for c in (1, 16)]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        # measured again after the server phases: the spread shows how noisy this machine is
        summary["raw_after"] = raw_phase(ckpt, args.batch, args.seconds)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
