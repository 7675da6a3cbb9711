"""How long large Open Inference Protocol JSON bodies stall the other routes of a server.

    python -m bench.oip_json                      # the server of this tree
    python -m bench.oip_json --tree /path/to/old  # the server of another checkout, same load
    python -m bench.oip_json --thread-probe       # also: the same parse on a thread, in here

The real server with the stand-in model (bench.standin_server: no inference cost) serves a
random resnet18 checkpoint at crop 224. `--bodies` JSON bodies (eight 224x224 images as
PIXELS UINT8 numbers flat, then nested, then as NORMALIZED FP32 numbers nested; then 26 such
images nested, a 20 MB body) are posted at once while /health is asked every 10 ms: the
worst /health answer is how long the event loop stalled. `--thread-probe` runs this tree's
parser on the same bodies on threads of this process while an asyncio loop measures its own
lag, with every body at once and with the largest alone: what a thread alone would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.common import benchmark_checkpoint, emit, environment
from bench.servertree import free_port, stop, wait_ready

logger = logging.getLogger(__name__)

IMAGES, CROP = 8, 224
LARGEST = 26  # crops of 224 whose nested JSON fills the default 20 MiB body limit
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def bodies(count: int) -> list[tuple[str, bytes]]:
    """`count` JSON bodies, cycling through four kinds: eight crops as PIXELS flat, nested
    and as NORMALIZED nested, and LARGEST crops as PIXELS nested (a 20 MB body)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (IMAGES, CROP, CROP, 3), dtype=np.uint8)
    normalized = ((pixels / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    largest = rng.integers(0, 256, (LARGEST, CROP, CROP, 3), dtype=np.uint8)
    kinds = [("PIXELS flat", "PIXELS", "UINT8", pixels, pixels.ravel().tolist()),
             ("PIXELS nested", "PIXELS", "UINT8", pixels, pixels.tolist()),
             ("NORMALIZED nested", "NORMALIZED", "FP32", normalized, normalized.tolist()),
             (f"PIXELS nested x{LARGEST}", "PIXELS", "UINT8", largest, largest.tolist())]
    out = []
    for i in range(count):
        label, name, datatype, array, data = kinds[i % len(kinds)]
        out.append((label, json.dumps({"inputs": [{"name": name, "datatype": datatype,
                                                   "shape": list(array.shape),
                                                   "data": data}]}).encode()))
    return out


def stall(url: str, load: list[tuple[str, bytes]]) -> dict[str, object]:
    """Post every body at once while polling /health; the answers' times and statuses."""
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                start_s = time.perf_counter()
                client.get(f"{url}/health")
                health.append(time.perf_counter() - start_s)
                time.sleep(0.01)

    def post(body: bytes) -> tuple[int, float]:
        start_s = time.perf_counter()
        r = httpx.post(f"{url}/v2/models/bench-resnet18/infer", content=body, timeout=120,
                       headers={"content-type": "application/json"})
        return r.status_code, time.perf_counter() - start_s

    with ThreadPoolExecutor(len(load) + 1) as pool:
        poller = pool.submit(poll)
        time.sleep(0.2)
        start_s = time.perf_counter()
        answers = list(pool.map(post, [body for _, body in load]))
        wall = time.perf_counter() - start_s
        done.set()
        poller.result()
    return {"bodies": [{"kind": kind, "mb": round(len(body) / 1e6, 1), "status": status,
                        "seconds": round(seconds, 2)}
                       for (kind, body), (status, seconds) in zip(load, answers, strict=True)],
            "wall_s": round(wall, 2), "health_max_s": round(max(health), 3),
            "health_p50_s": round(statistics.median(health), 3), "health_samples": len(health)}


def serve_and_measure(tree: Path, load: list[tuple[str, bytes]], rounds: int) -> list[dict]:
    """Start the stand-in server of `tree`, measure `rounds` times, stop it."""
    checkpoint = benchmark_checkpoint("resnet18", Path(tempfile.mkdtemp(prefix="oip-json-")))
    port = free_port()
    command = [sys.executable, "-m", "bench.standin_server", "--checkpoint-dir",
               str(checkpoint.parent), "--port", str(port), "--device", "cpu",
               "--max-upload-bytes", str(32 * 1024 * 1024), "--max-images-per-request",
               str(LARGEST), "--torch-threads", "1", "--log-level", "warning"]
    log = (checkpoint.parent / "server.log").open("wb")
    process = subprocess.Popen(command, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", process, 120)
        return [stall(f"http://127.0.0.1:{port}", load) for _ in range(rounds)]
    finally:
        stop(process)
        log.close()


def thread_probe(load: list[tuple[str, bytes]], rounds: int) -> list[dict[str, object]]:
    """This tree's parser on threads of this process: the worst lag of an asyncio loop, per
    round (it varies widely with how the threads meet the GIL)."""
    from app.api import v2_codec
    from app.api.v2_codec import InputContract, InputRule

    contract = InputContract(
        inputs={"PIXELS": InputRule("UINT8", ((-1, CROP, CROP, 3),)),
                "NORMALIZED": InputRule("FP32", ((-1, 3, CROP, CROP),))},
        outputs=("PROBABILITIES",), max_batch=LARGEST)

    async def run(load: list[tuple[str, bytes]]) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        done = False

        async def tick() -> None:
            while not done:
                start_s = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - start_s - 0.01)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)  # ticking before the first parse can take the GIL
        with ThreadPoolExecutor(len(load)) as pool:
            start_s = time.perf_counter()
            await asyncio.gather(*[loop.run_in_executor(
                pool, lambda b=body: v2_codec.parse_request(b, None, contract=contract))
                for _, body in load])
            wall = time.perf_counter() - start_s
        done = True
        await ticker
        return {"wall_s": round(wall, 2), "loop_lag_max_s": round(max(lags), 3)}

    largest = max(load, key=lambda item: len(item[1]) if "x" in item[0] else 0)
    return [{"all at once": asyncio.run(run(load)), f"{largest[0]} alone":
             asyncio.run(run([largest]))} for _ in range(rounds)]


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=4, help="posted at once")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the first includes starting the parser processes")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose server is measured")
    parser.add_argument("--thread-probe", action="store_true")
    parser.add_argument("--no-server", action="store_true", help="the thread probe only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    load = bodies(args.bodies)
    result: dict[str, object] = {"environment": environment(), "tree": str(args.tree)}
    if not args.no_server:
        result["server"] = serve_and_measure(args.tree, load, args.rounds)
    if args.thread_probe:
        result["thread_probe"] = thread_probe(load, args.rounds)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
