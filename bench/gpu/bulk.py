"""Bulk prediction: `python -m training predict CHECKPOINT FOLDER --output FILE` on the device.

Skipped, with a note, in a tree where the command does not exist yet; a flag it does not
know fails the step (the dry run is there to notice). The rate is images over the command's
whole wall time: process start, model load and warm-up included.
"""

from __future__ import annotations

import logging
import re
import time

from bench.gpu.context import PYTHON, Context, run_bounded
from bench.gpu.plan import Clock

logger = logging.getLogger(__name__)

PREDICT = [PYTHON, "-m", "training", "predict"]
_OWN_RATE = re.compile(r"in [0-9.]+ s; ([0-9.]+) images/s")


def own_rate(log: str) -> float | None:
    """The images/s `predict` logs for its own loop at the end ("... in 1.0 s; 3.8
    images/s"), or None when its log says no such thing."""
    found = _OWN_RATE.findall(log)
    return float(found[-1]) if found else None


def run(ctx: Context, clock: Clock) -> dict:
    """Write the plan's JPEGs to a folder and predict it, once."""
    plan = ctx.plan
    folder = ctx.work_dir / "bulk"
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = ctx.jpegs()
    for i in range(plan.bulk_images):
        (folder / f"photo-{i:05d}.jpg").write_bytes(jpegs[i % len(jpegs)])
    output = ctx.work_dir / "bulk-predictions.jsonl"
    command = [*PREDICT, str(ctx.checkpoint(plan.server_arch)), str(folder), "--output",
               str(output), "--device", plan.device, "--batch-size", str(plan.max_batch_size),
               "--no-progress", *plan.bulk_args]
    limit = clock.left()
    started = time.monotonic()
    done = run_bounded(command, limit, ctx.work_dir)
    if done is None:
        return {"status": "skipped", "reason": f"did not finish in the {limit:.0f} s left",
                "command": command}
    seconds = time.monotonic() - started
    (ctx.out_dir / "bulk-predict.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 and "invalid choice: 'predict'" in done.stderr:
        return {"status": "skipped",
                "reason": "python -m training predict does not exist in this tree"}
    if done.returncode != 0:
        return {"status": "failed", "error": done.stderr.strip()[-500:], "command": command}
    rows = output.read_text().splitlines() if output.exists() else []
    result = {"status": "ok", "command": command, "images": plan.bulk_images,
              "rows": len(rows), "errors": sum('"error"' in row for row in rows),
              "seconds": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 1),
              "own_images_per_s": own_rate(done.stderr)}
    if len(rows) != plan.bulk_images:
        result.update(status="failed", error=f"{len(rows)} rows for {plan.bulk_images} images")
    return result
