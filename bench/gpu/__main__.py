"""One command for a GPU window: the CUDA figures the project has never measured, in 8 minutes.

    bench/gpu.sh                          # set-up, then this; at most 8 minutes in all
    python -m bench.gpu [--budget-s 480] [--steps model,server] [--out-dir DIR]
    python -m bench.gpu --dry-run         # toy sizes, on the CPU without CUDA, in seconds

Steps, in the order they run: the CUDA tests, model-only images/s (eager), nvJPEG against
Pillow, the real server against LitServe (and /explain, and the front end alone), training
(AMP images/s, peak memory at docs/training.md's batch sizes), bulk prediction, then on whatever
time is left torch.compile and `training fit`. Each step has a time box (bench.gpu.plan);
what does not fit is skipped and named in the report. gpu.md (Markdown for
docs/benchmarks.md) and gpu.json are written under --out-dir after every step, so a run cut
short keeps what it measured. Exit status 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import environment
from bench.gpu import bulk, cuda_tests, decode_speed, model_speed, serving, training_speed
from bench.gpu.context import Context
from bench.gpu.plan import STEPS, Clock, Plan, step_clock
from bench.gpu.report import markdown

logger = logging.getLogger("bench.gpu")

WINDOW_S = 480.0  # the GPU window: 8 minutes, set-up included
DRY_BUDGET_S = 300.0
STEP_FUNCTIONS: dict[str, Callable[[Context, Clock], dict]] = {
    "tests": cuda_tests.run, "model": model_speed.eager, "decode": decode_speed.run,
    "server": serving.run, "training": training_speed.run, "bulk": bulk.run,
    "compile": model_speed.compiled, "fit": training_speed.fit_rate,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; the device defaults to CUDA, or the CPU for a dry run without it."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes, one short pass of every step (the CPU without CUDA)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--budget-s", type=float,
                        help=f"seconds for every step together (default {WINDOW_S:.0f}, "
                        f"{DRY_BUDGET_S:.0f} for a dry run); bench/gpu.sh passes what set-up "
                        "left of the 8 minutes")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated, any of {','.join(STEPS)}")
    parser.add_argument("--out-dir", type=Path, help="default bench/results/gpu-<date>")
    args = parser.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    if unknown := set(args.steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
        if not cuda and not args.dry_run:
            parser.error("no CUDA device here: run with --dry-run, or --device cpu to force "
                         "the full sizes on the CPU")
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda, but CUDA is not available")
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.dry_run else WINDOW_S
    if args.out_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
        args.out_dir = Path("bench/results") / f"gpu-{stamp}{'-dry' if args.dry_run else ''}"
    return args


def host_facts() -> dict:
    """bench.common.environment() plus CUDA, the driver and the CPUs this run may use."""
    facts = {**environment(), "cuda": torch.version.cuda,
             "cpus": len(os.sched_getaffinity(0)), "driver": None}
    if torch.cuda.is_available():
        facts["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory
                                        / 2**30, 1)
    if smi := shutil.which("nvidia-smi"):
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False)
        facts["driver"] = done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
    return facts


def run_step(name: str, ctx: Context, clock: Clock) -> dict:
    """One step under its clock; an exception becomes a failed result, not the end."""
    if clock.left() <= 0:
        return {"status": "skipped", "reason": "no time left in the budget"}
    started, cpu = time.monotonic(), _cpu_seconds()
    logger.info("step %s: %.0f s in its time box", name, clock.left())
    try:
        result = STEP_FUNCTIONS[name](ctx, clock)
    except Exception as exc:  # noqa: BLE001 - the report names it; the next step still runs
        logger.exception("step %s failed", name)
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.monotonic() - started, 1)
    result["cpu_s"] = round(_cpu_seconds() - cpu, 1)
    logger.info("step %s: %s in %.1f s (%.1f s of CPU here and in finished children)", name,
                result.get("status"), result["seconds"], result["cpu_s"])
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def write(report: dict, out_dir: Path) -> None:
    """gpu.json and gpu.md, whole, after every step."""
    (out_dir / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "gpu.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    """Run the asked-for steps within the budget, writing the report as it goes."""
    args = parse_args(argv)
    plan = Plan.dry(args.device) if args.dry_run else Plan.full(args.device)
    if plan.torch_threads:  # the dry run keeps to one core, here and in every child
        torch.set_num_threads(plan.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(plan.torch_threads)
    run_clock, started = Clock.start(args.budget_s), time.monotonic()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join(["python -m bench.gpu", *(argv or sys.argv[1:])]),
                    "dry_run": plan.dry_run, "budget_s": args.budget_s, "elapsed_s": 0,
                    "env": host_facts(), "plan": asdict(plan), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        ctx = Context(plan, args.out_dir, Path(work))
        for index, name in enumerate(STEPS):
            if name not in args.steps:
                continue
            later = [s for s in STEPS[index + 1:] if s in args.steps]
            report["steps"][name] = run_step(name, ctx, step_clock(run_clock, plan, name, later))
            report["elapsed_s"] = round(time.monotonic() - started, 1)
            write(report, args.out_dir)
    failed = [n for n, r in report["steps"].items() if r.get("status") == "failed"]
    logger.info("report: %s (%s)", args.out_dir / "gpu.md",
                f"failed: {', '.join(failed)}" if failed else "no step failed")
    sys.stdout.write(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sys.exit(main())
