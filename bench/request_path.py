"""The pure request path: /predict without decoding against the floor of its HTTP stack, A/B.

    python -m bench.request_path [--base REF [--new-files F ...]] [--rounds 3] [--seconds 8]
        [--concurrency 64] [--levels floor,fixed,decode] [--profile-seconds 5]

Levels, each one server process (`--workers 1`) loaded by wrk with `--images` JPEGs per request
(default 1):

- `floor`: bench.floor_server, the service's uvicorn configuration serving an ASGI callable
  that reads the body and answers a constant: what any Python server pays per request here;
- `fixed`: the service with the stand-in model and every upload "decoded" at once to one
  fixed crop (bench.standin_server --fixed-crop): HTTP, routing, auth, multipart, admission,
  batching, answers and JSON, with no decoding;
- `decode`: the same with the real decode processes.

Per level: requests/s, the server's CPU, requests per CPU-second of the server ("per core"),
and the event loop's (main thread's) CPU per request. With `--base REF` the same levels also
run from a worktree of REF (the code before a change, with this tree's bench/ laid over it),
alternating base and new each round in turning order, so drift on a shared machine hits both;
each round's ratios, then their median and range, are reported. `--new-files` runs the new
side from a worktree too, with only the named files of this tree: one change measured alone
while other edits are under way in this tree; `--new REF` runs it from a worktree of REF.
`--profile-seconds` adds one more pass per tree and level under py-spy, splitting the event
loop's CPU per request by stage (bench.stage_profile). Prints one JSON document, and a
Markdown summary on stderr.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.common import benchmark_checkpoint, emit, environment, web_jpegs
from bench.frontend import ARCH, check_answer, child_env
from bench.load import cpu_by_name, thread_cpu
from bench.servertree import free_port, start, stop, wait_ready
from bench.stage_profile import (
    main_thread_stages,
    record,
    split_ms,
    top_frames,
    user_and_kernel_seconds,
)
from bench.standin_server import FixedProbabilities
from bench.wrk import parse_output, request_bodies, run_wrk, write_script, wrk_binary
from models.checkpoint import load

logger = logging.getLogger(__name__)

LEVELS = ("floor", "fixed", "decode")


@dataclass
class Server:
    """One running server of one tree and level."""

    tree: str
    level: str
    base: str
    process: subprocess.Popen
    runs: list[dict] = field(default_factory=list)
    profile: dict | None = None


def server_command(level: str, checkpoint: Path, port: int, args: argparse.Namespace) -> list:
    """The command line of a level's server."""
    common = ["--port", str(port), "--log-level", "warning", "--workers", "1",
              *args.server_args.split()]
    if level == "floor":
        return [sys.executable, "-m", "bench.floor_server", "--checkpoint-dir",
                str(checkpoint.parent), *common]
    return [sys.executable, "-m", "bench.standin_server",
            *(["--fixed-crop"] if level == "fixed" else []),
            "--checkpoint-dir", str(checkpoint.parent), "--device", "cpu",
            "--max-batch-size", "32", "--max-queue", "1024", "--max-images-per-request", "64",
            "--torch-threads", "1", *common]


def measure(server: Server, script: Path, body: bytes, args: argparse.Namespace) -> dict:
    """Warm up, then one measured wrk run with the server's CPU accounted by thread."""
    if server.level != "floor":
        check_answer(server.base, body, args.images, args.top_score)
    run_wrk(f"{server.base}/predict", script, concurrency=args.concurrency,
            seconds=args.warmup)
    pid = server.process.pid
    before, (user0, kernel0) = thread_cpu(pid), user_and_kernel_seconds(pid)
    wrk = run_wrk(f"{server.base}/predict", script, concurrency=args.concurrency,
                  seconds=args.seconds)
    after, (user1, kernel1) = thread_cpu(pid), user_and_kernel_seconds(pid)
    by_thread = cpu_by_name(before, after)
    cpu = sum(by_thread.values())
    loop = after.get(f"{pid}/{pid}", ("", 0.0))[1] - before.get(f"{pid}/{pid}", ("", 0.0))[1]
    ok = max(1, wrk.ok)
    return {"req_per_s": round(wrk.ok / wrk.seconds, 1), "errors": wrk.errors,
            "p50_ms": round(wrk.p50_ms, 1), "p99_ms": round(wrk.p99_ms, 1),
            "server_cores": round(cpu / wrk.seconds, 3),
            "req_per_core": round(wrk.ok / cpu, 1) if cpu else None,
            "loop_ms_per_req": round(1000 * loop / ok, 3),
            "loop_user_ms_per_req": round(1000 * (user1 - user0) / ok, 3),
            "loop_kernel_ms_per_req": round(1000 * (kernel1 - kernel0) / ok, 3),
            "server_ms_per_req_by_thread": {k: round(1000 * s / ok, 3)
                                            for k, s in by_thread.items() if s > 0}}


def profile(server: Server, script: Path, args: argparse.Namespace) -> dict:
    """One pass under py-spy: the event loop's CPU per request, split by stage."""
    pid = server.process.pid
    out = args.out_dir / f"spy-{server.tree}-{server.level}.txt"
    loop0 = thread_cpu(pid).get(f"{pid}/{pid}", ("", 0.0))[1]
    loader = subprocess.Popen([wrk_binary(), "-t", "1", "-c", str(args.concurrency), "-d",
                               f"{round(args.profile_seconds) + 2}s", "-s", str(script),
                               f"{server.base}/predict"], stdout=subprocess.PIPE, text=True)
    try:
        record(pid, args.profile_seconds, out)
    finally:
        stdout, _ = loader.communicate()
    loop1 = thread_cpu(pid).get(f"{pid}/{pid}", ("", 0.0))[1]
    done = parse_output(stdout)
    profiled = 1000 * (loop1 - loop0) / max(1, done.ok)  # the whole wrk run, py-spy's inside
    # the shares come from the samples; the user and kernel time from the measured runs,
    # which py-spy's pauses did not slow
    if not server.runs:
        raise RuntimeError("profile a server after its measured runs")

    def median(key: str) -> float:
        return statistics.median(r[key] for r in server.runs)

    raw = out.read_text()
    return {"loop_ms_per_req": round(median("loop_ms_per_req"), 3),
            "loop_ms_per_req_profiled": round(profiled, 3),
            "stages_ms": split_ms(main_thread_stages(raw, pid), median("loop_user_ms_per_req"),
                                  median("loop_kernel_ms_per_req")),
            "top_frames": top_frames(raw, pid), "samples": str(out)}


def worktree(ref: str, root: Path, files: list[str] = ()) -> Path:
    """A detached worktree of `ref` with this tree's bench/ and `files` laid over it."""
    place = Path(tempfile.mkdtemp(prefix="request-path-"))
    place.rmdir()
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(place), ref],
                   check=True, capture_output=True)
    for source in (root / "bench").glob("*.py"):
        shutil.copy2(source, place / "bench" / source.name)
    for name in files:
        (place / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, place / name)
    return place


def spread(values: list[float]) -> dict:
    """Median, min and max."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def summarise(servers: list[Server], args: argparse.Namespace) -> dict:
    """Per tree and level the spread of each figure; the ratios per round and their spread."""
    by = {(s.tree, s.level): s for s in servers}
    out: dict = {"levels": {}, "ratios": {}}
    for s in servers:
        out["levels"][f"{s.tree}/{s.level}"] = {
            key: spread([r[key] for r in s.runs])
            for key in ("req_per_s", "req_per_core", "loop_ms_per_req", "loop_user_ms_per_req",
                        "loop_kernel_ms_per_req", "server_cores")
            if all(r.get(key) is not None for r in s.runs) and s.runs}
    for tree in args.trees:
        floor, fixed = by.get((tree, "floor")), by.get((tree, "fixed"))
        if floor and fixed:
            for key in ("req_per_core", "req_per_s"):
                out["ratios"][f"{tree}: fixed/floor {key}"] = spread(
                    [f[key] / g[key] for f, g in zip(fixed.runs, floor.runs, strict=True)])
    if len(args.trees) == 2:
        base, new = args.trees
        for level in args.levels:
            a, b = by.get((base, level)), by.get((new, level))
            if a and b:
                out["ratios"][f"{level}: new/base req_per_s"] = spread(
                    [y["req_per_s"] / x["req_per_s"] for x, y in zip(a.runs, b.runs, strict=True)])
                out["ratios"][f"{level}: new/base req_per_core"] = spread(
                    [y["req_per_core"] / x["req_per_core"]
                     for x, y in zip(a.runs, b.runs, strict=True)])
                out["ratios"][f"{level}: base/new loop ms"] = spread(
                    [x["loop_ms_per_req"] / y["loop_ms_per_req"]
                     for x, y in zip(a.runs, b.runs, strict=True)])
    return out


def table(result: dict) -> str:
    """Markdown: per tree and level, then the ratios, then the stage split."""
    lines = ["| tree/level | req/s | req per core-s | loop ms/req | server cores |",
             "|---|---|---|---|---|"]

    def cell(d: dict | None) -> str:
        return "" if not d else f"{d['median']:g} ({d['min']:g}-{d['max']:g})"

    for name, figs in result["summary"]["levels"].items():
        lines.append(f"| {name} | {cell(figs.get('req_per_s'))} | "
                     f"{cell(figs.get('req_per_core'))} | {cell(figs.get('loop_ms_per_req'))} | "
                     f"{cell(figs.get('server_cores'))} |")
    lines += ["", "| ratio | median (min-max, n) |", "|---|---|"]
    for name, d in result["summary"]["ratios"].items():
        lines.append(f"| {name} | {d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f}, {d['n']}) |")
    for name, prof in result.get("profiles", {}).items():
        stages = ", ".join(f"{k} {v:.3f}" for k, v in prof["stages_ms"].items())
        lines.append(f"\n{name}: event loop {prof['loop_ms_per_req']:.3f} ms/req: {stages}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a git ref to compare this tree with (A/B)")
    parser.add_argument("--new", help="run the new side from a worktree of this ref instead "
                        "of this tree")
    parser.add_argument("--new-files", nargs="*", default=[],
                        help="run the new side from a worktree of --base with only these "
                        "files of this tree laid over it (other edits in this tree left out)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured, per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured, per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--images", type=int, default=1, help="JPEGs per request")
    parser.add_argument("--levels", default="floor,fixed",
                        help=f"comma-separated, of {', '.join(LEVELS)}")
    parser.add_argument("--profile-seconds", type=float, default=0.0,
                        help="one more pass per server under py-spy (0: none)")
    parser.add_argument("--server-args", default="", help="more flags for every server")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results") / (
        "request-path-" + datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S")))
    args = parser.parse_args(argv)
    args.levels = [level for level in args.levels.split(",") if level]
    if unknown := set(args.levels) - set(LEVELS):
        parser.error(f"unknown levels {sorted(unknown)}; choose from {LEVELS}")
    args.trees = ["base", "new"] if args.base else ["new"]
    if args.new_files and not (args.base or args.new):
        parser.error("--new-files needs --base or --new")
    if wrk_binary() is None:
        parser.error("wrk is not installed (Debian: apt-get install wrk)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Start every server, alternate the measured runs, profile, summarise, print."""
    args = parse_args(argv)
    root = Path.cwd()
    checkpoint = benchmark_checkpoint(ARCH, Path("bench/results/checkpoints") / ARCH).resolve()
    args.top_score = float(FixedProbabilities(load(checkpoint)[1]).row.max())
    body = request_bodies(web_jpegs(), args.images)
    script = write_script(args.out_dir / "bodies", body)
    places = {"new": (worktree(args.new or args.base, root, args.new_files)
                      if args.new or args.new_files else root)}
    if args.base:
        places["base"] = worktree(args.base, root)
    servers: list[Server] = []
    try:
        for tree in args.trees:
            for level in args.levels:
                port = free_port()
                process = start(server_command(level, checkpoint, port, args),
                                args.out_dir / f"{tree}-{level}.log",
                                child_env(1), cwd=places[tree])
                servers.append(Server(tree, level, f"http://127.0.0.1:{port}", process))
        for server in servers:
            wait_ready(server.base + "/ready", server.process, args.start_timeout)
        for round_ in range(args.rounds):
            order = args.trees if round_ % 2 == 0 else args.trees[::-1]
            for level in args.levels:
                for tree in order:
                    server = next(s for s in servers if (s.tree, s.level) == (tree, level))
                    run = measure(server, script, body[0], args)
                    logger.info("round %d %s/%s: %s req/s, %s req per core-s, loop %s ms/req",
                                round_, tree, level, run["req_per_s"], run["req_per_core"],
                                run["loop_ms_per_req"])
                    server.runs.append(run)
        profiles = {}
        if args.profile_seconds:
            for server in servers:
                profiles[f"{server.tree}/{server.level}"] = profile(server, script, args)
    finally:
        for server in servers:
            stop(server.process)
        for place in places.values():
            if place != root:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force",
                                str(place)], check=False, capture_output=True)
    result = {"env": environment(), "arch": ARCH, "concurrency": args.concurrency,
              "images_per_request": args.images,
              "seconds": args.seconds, "rounds": args.rounds, "base": args.base,
              "command": " ".join(["python -m bench.request_path", *(argv or sys.argv[1:])]),
              "runs": {f"{s.tree}/{s.level}": s.runs for s in servers},
              "profiles": profiles}
    result["summary"] = summarise(servers, args)
    sys.stderr.write(table(result) + "\n")
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    main()
