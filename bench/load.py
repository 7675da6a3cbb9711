"""An async HTTP load generator for the service (loopback only, bounded in requests and time).

    python -m bench.load --url http://127.0.0.1:8000 --concurrency 1,4,16,64 --images 1,8

Posts real web-size JPEG photos; reports req/s, images/s, p50/p95/p99 latency, errors, the
mean batch size the server ran (from /metrics) and this process's own CPU use. Given the
server's process id (`--server-pid`, Linux), it also reports the server's CPU time per image,
split by OS thread name (the service names its threads `compute`, `decode` and `load-<model>`;
a process's first thread, which runs the event loop in the service, is reported as `main`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from bench.common import web_jpegs

logger = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class Tally:
    """What one load level saw."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    images: int = 0
    transport_errors: int = 0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def batch_stats(metrics_text: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram from Prometheus text."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        m = re.match(r"^(\w*batch_size\w*)_(sum|count)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            if m.group(2) == "sum":
                total += float(m.group(4))
            else:
                count += float(m.group(4))
    return total, count


def thread_cpu(pid: int, proc: Path = Path("/proc")) -> dict[str, tuple[str, float]]:
    """CPU seconds and name of every thread of `pid` and of its descendant processes.

    Keys are "pid/tid"; a process's first thread is named "main". Threads that end between
    two snapshots are missing from the later one, so their time is not counted.
    """
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = defaultdict(list)
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(entry)
            except OSError:
                continue
            children[int(fields[1])].append(int(entry.name))
    out: dict[str, tuple[str, float]] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            tasks = list((proc / str(current) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                name = (task / "comm").read_text().strip()
                fields = _stat_fields(task)
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            out[f"{current}/{task.name}"] = ("main" if task.name == str(current) else name,
                                              seconds)
    return out


def _stat_fields(entry: Path) -> list[str]:
    """The fields of `entry`/stat after the name (which may hold spaces and parentheses)."""
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()


def cpu_by_name(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]]
                ) -> dict[str, float]:
    """CPU seconds spent between two `thread_cpu` snapshots, summed by thread name."""
    spent: dict[str, float] = defaultdict(float)
    for key, (name, seconds) in after.items():
        spent[name] += seconds - before.get(key, (name, 0.0))[1]
    return {name: s for name, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s > 0}


async def _worker(client: httpx.AsyncClient, url: str, bodies: list[list[tuple]],
                  deadline: float, budget: list[int], tally: Tally, n_images: int) -> None:
    i = 0
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1
        files = bodies[i % len(bodies)]
        i += 1
        start = time.perf_counter()
        try:
            response = await client.post(url, files=files)
        except httpx.HTTPError:
            tally.transport_errors += 1
            continue
        tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            tally.latencies.append(time.perf_counter() - start)
            tally.images += n_images


async def run_level(base: str, *, concurrency: int, images: int, seconds: float,
                    max_requests: int, jpegs: list[bytes], params: str = "",
                    server_pid: int | None = None, path: str = "/predict") -> dict:
    """Drive one (concurrency, images per request) level of POSTs to `path` and summarise it."""
    bodies = [[("file", (f"img{j}.jpg", jpegs[(i + j) % len(jpegs)], "image/jpeg"))
               for j in range(images)] for i in range(len(jpegs))]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        before = batch_stats((await client.get("/metrics")).text)
        tally, budget = Tally(), [max_requests]
        server0 = thread_cpu(server_pid) if server_pid else {}
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(*(
            _worker(client, f"{path}{params}", bodies, deadline, budget, tally, images)
            for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        server = cpu_by_name(server0, thread_cpu(server_pid)) if server_pid else {}
        after = batch_stats((await client.get("/metrics")).text)
    ok = tally.statuses.get(200, 0)
    batches = after[1] - before[1]
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    server_cpu = {}
    if server_pid:
        per_image = 1000 / max(1, tally.images)
        server_cpu = {
            "server_cpu_pct": round(100 * sum(server.values()) / wall, 1),
            "server_cpu_ms_per_image": round(sum(server.values()) * per_image, 2),
            "server_cpu_ms_per_image_by_thread": {
                name: round(s * per_image, 2) for name, s in server.items()},
        }
    return {
        "concurrency": concurrency, "images_per_request": images,
        "requests": sum(tally.statuses.values()) + tally.transport_errors, "ok": ok,
        "errors": sum(v for k, v in tally.statuses.items() if k != 200) + tally.transport_errors,
        "statuses": tally.statuses, "seconds": round(wall, 2),
        "req_per_s": round(ok / wall, 2), "images_per_s": round(tally.images / wall, 2),
        "p50_ms": round(1000 * percentile(tally.latencies, 50), 1),
        "p95_ms": round(1000 * percentile(tally.latencies, 95), 1),
        "p99_ms": round(1000 * percentile(tally.latencies, 99), 1),
        "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
        "loadgen_cpu_pct": round(100 * cpu / wall, 1),
        **server_cpu,
    }


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine."""
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"refusing to load {host!r}: loopback addresses only")


async def run(url: str, concurrencies: list[int], images: list[int], seconds: float,
              max_requests: int, params: str = "", warmup_s: float = 2.0,
              server_pid: int | None = None) -> list[dict]:
    """All levels in order, each after a short unmeasured warm-up."""
    check_loopback(url)
    jpegs = web_jpegs()
    results = []
    for n_images in images:
        for c in concurrencies:
            if warmup_s:
                await run_level(url, concurrency=c, images=n_images, seconds=warmup_s,
                                max_requests=max_requests, jpegs=jpegs, params=params)
            level = await run_level(url, concurrency=c, images=n_images, seconds=seconds,
                                    max_requests=max_requests, jpegs=jpegs, params=params,
                                    server_pid=server_pid)
            logger.info("c=%d images=%d: %.1f img/s p50 %.0f ms p99 %.0f ms errors %d",
                        c, n_images, level["images_per_s"], level["p50_ms"], level["p99_ms"],
                        level["errors"])
            results.append(level)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--images", default="1,8", help="images per request")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level")
    parser.add_argument("--max-requests", type=int, default=5000, help="per level")
    parser.add_argument("--params", default="", help="query string, e.g. ?top_k=1")
    parser.add_argument("--server-pid", type=int,
                        help="the server's process id: report its CPU per image by thread "
                             "(Linux; child processes included)")
    args = parser.parse_args(argv)
    if args.server_pid and not Path(f"/proc/{args.server_pid}/task").is_dir():
        parser.error(f"no process {args.server_pid} to account CPU for (Linux /proc only)")
    results = asyncio.run(run(args.url, [int(c) for c in args.concurrency.split(",")],
                              [int(i) for i in args.images.split(",")], args.seconds,
                              args.max_requests, args.params, server_pid=args.server_pid))
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    main()
