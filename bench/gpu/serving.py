"""The real server on real JPEGs, its /explain, the front end alone, and LitServe on the same.

Three servers in turn, each started, checked by hand, loaded and stopped, each only when its
start and a level still fit in the step's time box:
- `python -m app` with the real model, `--workers 0` (automatic), at each level of the plan
  (images per request x concurrency), then POST /explain on the same process;
- LitServe (bench.peers litserve) on the same checkpoint and device, at the same levels;
- the stand-in server (bench.standin_server: the service with a model that answers fixed
  logits): its answer is checked against the stand-in's own top score, so a stand-in that
  answers the wrong thing (as it once answered probabilities where logits are expected) fails
  here; then the first level again: the front end alone at this host's core count.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import httpx

from app.process.sizing import workers_for
from bench.frontend import check_answer, child_env
from bench.gpu.context import PYTHON, Context
from bench.gpu.loadgen import Target, loadgen_name, measure
from bench.gpu.plan import Clock
from bench.gpu.stages import process_table, serving_processes
from bench.load import thread_cpu
from bench.servertree import free_port, start, stop, wait_ready
from bench.standin_server import FixedProbabilities
from bench.wrk import content_type, multipart_body

logger = logging.getLogger(__name__)

START_ESTIMATE_S = {True: 15.0, False: 45.0}  # dry run, GPU: a server's start and warm-up


def check_results(base: str, path: str, jpegs: list[bytes], images: int) -> None:
    """One request by hand: 200 and one well-formed result per image, else RuntimeError."""
    body = multipart_body([(f"img{i}.jpg", jpegs[i % len(jpegs)]) for i in range(images)])
    response = httpx.post(base + path, content=body, timeout=120,
                          headers={"Content-Type": content_type()})
    results = response.json().get("results") if response.status_code == 200 else None
    if not isinstance(results, list) or len(results) != images:
        raise RuntimeError(f"POST {path} answered {response.status_code}: "
                           f"{response.text[:300]!r}")
    for result in results:
        scores = ([p["score"] for p in result.get("predictions", [])] if path == "/predict"
                  else [result.get("score")])
        if not scores or not all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores):
            raise RuntimeError(f"POST {path} answered a result without valid scores: "
                               f"{str(result)[:300]}")


def _level_seconds(ctx: Context) -> float:
    return ctx.plan.level_seconds + ctx.plan.warmup_seconds + 3.0


class Server:
    """One benchmarked server process: started on a free port, stopped on exit."""

    def __init__(self, name: str, command: list[str], ready_path: str, ctx: Context,
                 timeout_s: float) -> None:
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = ctx.out_dir / f"{name}.log"
        self.command = [*command, "--port", str(self.port)]
        self.ready_path, self.timeout_s, self.ctx = ready_path, timeout_s, ctx

    def __enter__(self) -> Server:
        logger.info("%s: %s", self.name, " ".join(self.command))
        self.process = start(self.command, self.log, child_env(self.ctx.plan.torch_threads))
        try:
            wait_ready(self.base + self.ready_path, self.process, self.timeout_s)
        except BaseException:
            stop(self.process)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.process)

    @property
    def target(self) -> Target:
        return Target(self.base, self.process.pid)

    def processes(self) -> int:
        """How many processes serve requests (the automatic worker count, for the service)."""
        return serving_processes(self.process.pid, process_table(thread_cpu(self.process.pid)))


def _levels(server: Server, ctx: Context, clock: Clock, jpegs: list[bytes], path: str,
            levels: tuple[tuple[int, int], ...], notes: list[str]) -> list[dict]:
    out = []
    for images, concurrency in levels:
        if not clock.allows(_level_seconds(ctx)):
            notes.append(f"{server.name} {path} {images} img/req c={concurrency}: skipped "
                         f"({clock.left():.0f} s left)")
            continue
        check_results(server.base, path, jpegs, images)
        level = measure(server.target, jpegs, path=path, images=images, concurrency=concurrency,
                        seconds=ctx.plan.level_seconds, warmup=ctx.plan.warmup_seconds,
                        work_dir=ctx.work_dir / "bodies" / server.name)
        logger.info("%s %s %d img/req c=%d: %.1f img/s, p99 %.0f ms, errors %d", server.name,
                    path, images, concurrency, level["images_per_s"], level["p99_ms"],
                    level["errors"])
        out.append(level)
    return out


def _part(name: str, fn: Callable[..., dict], *args: object) -> dict:
    """Run one server's part; a failure is recorded in its result, not raised."""
    try:
        return {"status": "ok", **fn(*args)}
    except (RuntimeError, OSError, httpx.HTTPError, ValueError) as exc:
        logger.error("%s failed: %s", name, exc)
        return {"status": "failed", "error": str(exc)}


def standin(ctx: Context, clock: Clock, checkpoint: Path, jpegs: list[bytes],
            notes: list[str]) -> dict:
    """The stand-in server: its answer checked, then the front end alone at one level."""
    plan = ctx.plan
    command = [PYTHON, "-m", "bench.standin_server", "--checkpoint-dir", str(checkpoint.parent),
               "--device", plan.device, "--workers", "0", "--max-batch-size",
               str(plan.max_batch_size), "--max-queue", "1024", "--max-images-per-request",
               "64", "--log-level", "warning", *plan.server_args]
    top_score = float(FixedProbabilities(ctx.card(plan.server_arch)).row.max())
    with Server("standin", command, "/ready", ctx, plan.start_timeout_s) as server:
        for images in sorted({1, max(i for i, _ in plan.levels)}):
            body = multipart_body([(f"img{i}.jpg", jpegs[i % len(jpegs)])
                                   for i in range(images)])
            check_answer(server.base, body, images, top_score)
        levels = _levels(server, ctx, clock, jpegs, "/predict", plan.levels[:1], notes)
        return {"answer_check": "passed", "workers": server.processes(), "levels": levels}


def service(ctx: Context, clock: Clock, checkpoint: Path, jpegs: list[bytes],
            notes: list[str]) -> dict:
    """`python -m app` with the real model: the plan's levels, then /explain."""
    plan = ctx.plan
    command = [PYTHON, "-m", "app", "--checkpoint-dir", str(checkpoint.parent), "--host",
               "127.0.0.1", "--device", plan.device, "--workers", "0", "--max-batch-size",
               str(plan.max_batch_size), "--max-queue", "1024", "--max-images-per-request",
               "64", "--log-level", "warning", *plan.server_args]
    with Server("service", command, "/ready", ctx, plan.start_timeout_s) as server:
        workers = server.processes()
        levels = _levels(server, ctx, clock, jpegs, "/predict", plan.levels, notes)
        explain = _part("explain", lambda: {"levels": _levels(
            server, ctx, clock, jpegs, "/explain", ((1, plan.explain_concurrency),), notes)})
    return {"workers": workers, "levels": levels, "command": command, "explain": explain}


def litserve(ctx: Context, clock: Clock, checkpoint: Path, jpegs: list[bytes],
             notes: list[str]) -> dict:
    """LitServe around the same checkpoint, decode, transform and Predictor."""
    plan = ctx.plan
    if importlib.util.find_spec("litserve") is None:
        return {"status": "unavailable",
                "reason": "litserve is not installed (pip install -e '.[bench]')"}
    per = 1 if plan.dry_run else workers_for(0, on_cuda=plan.device == "cuda")
    command = [PYTHON, "-m", "bench.peers", "litserve", "--checkpoint", str(checkpoint),
               "--device", plan.device, "--max-batch-size", str(plan.max_batch_size),
               "--batch-timeout", "0.01", "--api-servers", str(per),
               "--workers-per-device", str(per)]
    with Server("litserve", command, "/health", ctx, plan.start_timeout_s) as server:
        levels = _levels(server, ctx, clock, jpegs, "/predict", plan.levels, notes)
    return {"api_servers": per, "workers_per_device": per, "levels": levels}


def run(ctx: Context, clock: Clock) -> dict:
    """The three servers in turn, each only when its start and one level still fit."""
    plan, notes = ctx.plan, []
    checkpoint = ctx.checkpoint(plan.server_arch)
    jpegs = ctx.jpegs()
    out: dict = {"arch": plan.server_arch, "loadgen": loadgen_name(), "notes": notes}
    for name, fn in (("service", service), ("litserve", litserve), ("standin", standin)):
        if not clock.allows(START_ESTIMATE_S[plan.dry_run] + _level_seconds(ctx)):
            out[name] = {"status": "skipped", "reason": f"{clock.left():.0f} s left"}
            continue
        out[name] = _part(name, fn, ctx, clock, checkpoint, jpegs, notes)
    out["explain"] = out["service"].pop("explain", None) or {
        "status": "skipped", "reason": f"the service did not run ({out['service']['status']})"}
    failed = [f"{name}: {part['error']}" for name, part in out.items()
              if isinstance(part, dict) and part.get("status") == "failed"]
    return {"status": "failed", "error": "; ".join(failed), **out} if failed else {
        "status": "ok", **out}
