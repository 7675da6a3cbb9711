"""The front end alone: the real server with a stand-in model, against LitServe on the same.

    python -m bench.frontend [--seconds 10] [--workers 1,2] [--concurrency 16,64] [--images 1,8]

HTTP, multipart, decode + resize, batching, post-processing and JSON are the service's own;
the model answers fixed probabilities at once (bench.standin_server), and LitServe runs the
same decode, transform and stand-in (bench.litserve_peer.StandinAPI). wrk loads each server
(bench.wrk). Per level: images/s, latency, errors, and the server's CPU ms per image by
thread name and by process role. Beside them, the service's own decode + eval transform on
one core, alone: how close each server comes to cores x that rate. Every server process runs
torch on --torch-threads threads (default 1: the stand-in computes nothing, and idle OpenMP
threads would spin on the cores the front end needs). Prints one JSON document;
logs and temporary request bodies go under --out-dir (in bench/results/).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import resource
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx

from app.process.allocator import find_tcmalloc
from bench.common import benchmark_checkpoint, emit, environment, web_jpegs
from bench.frontend_report import summarise, table
from bench.load import batch_stats, cpu_by_name, thread_cpu
from bench.raw import preprocess_images_per_s
from bench.servertree import cpu_by_role, free_port, start, stop, wait_ready
from bench.standin_server import FixedProbabilities
from bench.wrk import content_type, request_bodies, run_wrk, write_script, wrk_binary
from models.checkpoint import load

logger = logging.getLogger(__name__)

ARCH = "resnet50"


def workers_supported() -> bool:
    """Whether `python -m app` has --workers and lets a benchmark hook each worker."""
    import app.__main__ as app_main
    from app.config import Settings

    return ("workers" in Settings.model_fields
            and "worker_entry" in inspect.signature(app_main.main).parameters)


def child_env(torch_threads: int) -> dict[str, str]:
    """The environment of every server, alike: tcmalloc preloaded when installed, and torch's
    intra-op threads (OMP_NUM_THREADS) set when `torch_threads` is not 0."""
    env = dict(os.environ)
    if not env.get("LD_PRELOAD") and (library := find_tcmalloc()):
        env["LD_PRELOAD"] = library
    if torch_threads:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    return env


def check_answer(base: str, body: bytes, images: int, top_score: float) -> None:
    """One request by hand: 200, one result per image, and the stand-in's top score (so a
    process that runs the real model is caught), or RuntimeError."""
    response = httpx.post(f"{base}/predict", content=body, timeout=60,
                          headers={"Content-Type": content_type()})
    results = (response.json().get("results") if response.status_code == 200 else None)
    if not isinstance(results, list) or len(results) != images:
        raise RuntimeError(f"POST /predict answered {response.status_code}: "
                           f"{response.text[:300]!r}")
    scores = {round(r["predictions"][0]["score"], 6) for r in results}
    if scores != {round(top_score, 6)}:
        raise RuntimeError(f"top scores {sorted(scores)} are not the stand-in's {top_score:.6f}: "
                           "the stand-in model is not in use")


def mean_batch(base: str) -> tuple[float, float] | None:
    """(sum, count) of the server's batch-size histogram, None where it has no /metrics."""
    try:
        response = httpx.get(f"{base}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return batch_stats(response.text) if response.status_code == 200 else None


def event_loop_seconds(snapshot: dict[str, tuple[str, float]]) -> float:
    """CPU seconds of the server processes' main threads, their event loops: every process
    of the tree but the decode processes (named resnet-decode) and their fork server."""
    total = 0.0
    for key, (_, seconds) in snapshot.items():
        pid, tid = key.split("/", 1)
        if pid != tid:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name != "resnet-decode" and b"forkserver" not in command:
            total += seconds
    return total


def run_level(base: str, script: Path, body: bytes, *, concurrency: int, images: int,
              args: argparse.Namespace, root: int) -> dict:
    """Warm up, then load one (concurrency, images per request) level and account it."""
    for _ in range(args.checks):
        check_answer(base, body, images, args.top_score)
    if args.warmup:
        run_wrk(f"{base}/predict", script, concurrency=concurrency, seconds=args.warmup,
                threads=args.wrk_threads)
    batches0, cpu0 = mean_batch(base), thread_cpu(root)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk = run_wrk(f"{base}/predict", script, concurrency=concurrency, seconds=args.seconds,
                  threads=args.wrk_threads)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1, batches1 = thread_cpu(root), mean_batch(base)
    by_thread, by_role = cpu_by_name(cpu0, cpu1), cpu_by_role(cpu0, cpu1, root)
    loop = event_loop_seconds(cpu1) - event_loop_seconds(
        {key: cpu0.get(key, value) for key, value in cpu1.items()})
    done = wrk.ok * images
    per_image = 1000 / max(1, done)
    batch = None
    if batches0 and batches1 and batches1[1] > batches0[1]:
        batch = round((batches1[0] - batches0[0]) / (batches1[1] - batches0[1]), 2)
    loadgen = (kids1.ru_utime - kids0.ru_utime) + (kids1.ru_stime - kids0.ru_stime)
    return {
        "concurrency": concurrency, "images_per_request": images, "requests": wrk.requests,
        "ok": wrk.ok, "http_errors": wrk.http_errors, "socket_errors": wrk.socket_errors,
        "errors": wrk.errors, "seconds": round(wrk.seconds, 2),
        "req_per_s": round(wrk.ok / wrk.seconds, 2),
        "images_per_s": round(done / wrk.seconds, 2),
        "p50_ms": round(wrk.p50_ms, 1), "p99_ms": round(wrk.p99_ms, 1),
        "max_ms": round(wrk.max_ms, 1), "mean_batch": batch,
        "loadgen_cpu_pct": round(100 * loadgen / wrk.seconds, 1),
        "server_cpu_pct": round(100 * sum(by_thread.values()) / wrk.seconds, 1),
        "server_cpu_ms_per_image": round(sum(by_thread.values()) * per_image, 3),
        "event_loop_ms_per_request": round(1000 * loop / max(1, wrk.ok), 3),
        "server_cpu_ms_per_image_by_thread": {k: round(s * per_image, 3)
                                              for k, s in by_thread.items()},
        "server_cpu_ms_per_image_by_role": {k: round(s * per_image, 3)
                                            for k, s in by_role.items()},
    }


def serve_and_load(name: str, command: list[str], ready_path: str, port: int,
                   loads: dict[int, tuple[Path, bytes]], args: argparse.Namespace) -> dict:
    """Start one server, run every level against it, stop it; errors become the result."""
    base = f"http://127.0.0.1:{port}"
    logger.info("%s: %s", name, " ".join(command))
    process = start(command, args.out_dir / f"{name}.log", child_env(args.torch_threads))
    out: dict = {"command": command, "levels": []}
    try:
        wait_ready(base + ready_path, process, args.start_timeout)
        for images, (script, body) in loads.items():
            for concurrency in args.concurrency:
                level = run_level(base, script, body, concurrency=concurrency, images=images,
                                  args=args, root=process.pid)
                logger.info("%s c=%d img=%d: %.1f img/s, p50 %.0f ms, errors %d", name,
                            concurrency, images, level["images_per_s"], level["p50_ms"],
                            level["errors"])
                out["levels"].append(level)
    except (RuntimeError, OSError, httpx.HTTPError, ValueError) as exc:
        logger.error("%s failed: %s (log: %s)", name, exc, args.out_dir / f"{name}.log")
        out["error"] = str(exc)
    finally:
        stop(process)
    return out


def service_runs(checkpoint: Path, loads: dict[int, tuple[Path, bytes]],
                 args: argparse.Namespace) -> list[dict]:
    """The stand-in service at each worker count."""
    supported = workers_supported()
    runs = []
    for workers in args.workers:
        if workers > 1 and not supported:
            runs.append({"workers": workers, "skipped": "python -m app has no --workers with "
                         "worker_entry yet"})
            continue
        port = free_port()
        command = [sys.executable, "-m", "bench.standin_server",
                   "--checkpoint-dir", str(checkpoint.parent), "--port", str(port),
                   "--device", args.device, "--max-batch-size", str(args.max_batch_size),
                   "--max-queue", "1024", "--max-images-per-request", "64",
                   "--log-level", "warning", *(["--workers", str(workers)] if supported else []),
                   *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
                   *args.server_args.split()]
        runs.append({"workers": workers, **serve_and_load(f"service-w{workers}", command,
                                                          "/ready", port, loads, args)})
    return runs


def litserve_runs(checkpoint: Path, loads: dict[int, tuple[Path, bytes]],
                  args: argparse.Namespace) -> list[dict]:
    """LitServe with the stand-in, at each (num_api_servers, workers_per_device)."""
    runs = []
    for api_servers, per_device in args.litserve:
        port = free_port()
        command = [sys.executable, "-m", "bench.peers", "litserve", "--standin",
                   "--checkpoint", str(checkpoint), "--port", str(port), "--device", "cpu",
                   "--max-batch-size", str(args.litserve_batch),
                   "--batch-timeout", str(args.litserve_wait),
                   "--api-servers", str(api_servers), "--workers-per-device", str(per_device)]
        name = f"litserve-a{api_servers}-w{per_device}"
        runs.append({"api_servers": api_servers, "workers_per_device": per_device,
                     **serve_and_load(name, command, "/health", port, loads, args)})
    return runs


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured, per level")
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="service workers")
    parser.add_argument("--concurrency", type=_ints, default=[16, 64])
    parser.add_argument("--images", type=_ints, default=[1, 8], help="images per request")
    parser.add_argument("--litserve", default="1x1,1x2,2x1,2x2",
                        help="LitServe num_api_servers x workers_per_device, or none")
    parser.add_argument("--litserve-batch", type=int, default=16)
    parser.add_argument("--litserve-wait", type=float, default=0.01, help="seconds")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the service's")
    parser.add_argument("--device", default="cpu", help="the service's (the stand-in is free)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of every server process (0: their defaults); the "
                        "stand-in needs none, and idle OpenMP threads spin on the cores")
    parser.add_argument("--server-args", default="", help="more flags for the service")
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--checks", type=int, default=4,
                        help="requests checked by hand before each level")
    parser.add_argument("--wrk-threads", type=int, default=0, help="0: one per 4 cores")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results") / (
        "frontend-" + datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")))
    args = parser.parse_args(argv)
    args.litserve = ([] if args.litserve == "none" else
                     [tuple(int(n) for n in pair.split("x")) for pair in args.litserve.split(",")])
    args.wrk_threads = args.wrk_threads or max(1, len(os.sched_getaffinity(0)) // 4)
    if wrk_binary() is None:
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Measure the raw rate, every service and LitServe level, the raw rate again; print."""
    args = parse_args(argv)
    checkpoint = benchmark_checkpoint(ARCH, Path("bench/results/checkpoints") / ARCH)
    card = load(checkpoint)[1]
    pre = card.preprocessing
    args.top_score = float(FixedProbabilities(card).row.max())
    jpegs = web_jpegs()
    raw_before = preprocess_images_per_s(pre, jpegs, args.raw_seconds)
    bodies_dir = args.out_dir / "bodies"
    loads = {}
    for images in args.images:
        bodies = request_bodies(jpegs, images)
        loads[images] = (write_script(bodies_dir / f"images-{images}", bodies), bodies[0])
    try:
        service = service_runs(checkpoint, loads, args)
        litserve = litserve_runs(checkpoint, loads, args)
    finally:
        shutil.rmtree(bodies_dir, ignore_errors=True)
    raw_after = preprocess_images_per_s(pre, jpegs, args.raw_seconds)
    result = summarise({
        "env": environment(), "arch": ARCH, "crop": pre.crop, "resize": pre.resize,
        "cores": len(os.sched_getaffinity(0)), "seconds_per_level": args.seconds,
        "warmup_per_level": args.warmup,
        "torch_threads": args.torch_threads,
        "server_ld_preload": child_env(args.torch_threads).get("LD_PRELOAD"),
        "loadgen": {"tool": "wrk", "threads": args.wrk_threads, "keep_alive": True},
        "raw_decode_resize_one_core": {"before": round(raw_before, 1),
                                       "after": round(raw_after, 1)},
        "service": service, "litserve": litserve,
    })
    sys.stderr.write(table(result) + "\n")
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    main()
