"""Training on the device: AMP images/s, one step's peak memory, and `training fit` itself.

- AMP: bench.train's bare loop (forward, backward and AdamW on a batch already on the device,
  channels_last, autocast, a GradScaler for fp16), at each precision of the plan.
- Peak memory: one training step (the same loop, a fresh model and optimizer) at every batch
  docs/training.md's 512 px table recommends, `torch.cuda.max_memory_allocated()` over what was
  allocated before it, against 75% of the smallest GPU its row names (the rule the table
  was computed with: bench.train_memory.HEADROOM).
- `training fit` (a step of its own, last, on the time left): `python -m bench.train`
  (synthetic data, `fit` from scratch, images/s of its epochs after the first against the
  bare loop).
"""

from __future__ import annotations

import json
import logging
import time

import torch

from bench.gpu.context import PYTHON, Context, run_bounded
from bench.gpu.plan import Clock
from bench.gpu.readme_batches import BatchClaim, read_claims
from bench.train import bare_images_per_s
from bench.train_memory import GIB, HEADROOM
from models.architectures import build
from models.device import Accelerator, is_out_of_memory, release_cuda_cache

logger = logging.getLogger(__name__)

CLASSES = 10


def step_peak_bytes(arch: str, batch: int, size: int, accelerator: Accelerator) -> int | None:
    """Peak bytes one training step adds on CUDA (None on another device)."""
    if not accelerator.is_cuda:
        _one_step(arch, batch, size, accelerator)  # the same code, unmeasured
        return None
    release_cuda_cache()
    base = torch.cuda.memory_allocated(accelerator.device)
    torch.cuda.reset_peak_memory_stats(accelerator.device)
    _one_step(arch, batch, size, accelerator)
    accelerator.synchronize()
    peak = torch.cuda.max_memory_allocated(accelerator.device) - base
    release_cuda_cache()
    return peak


def _one_step(arch: str, batch: int, size: int, accelerator: Accelerator) -> None:
    model = accelerator.prepare_model(build(arch, num_classes=CLASSES, weights=None)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(enabled=accelerator.amp_dtype == torch.float16)
    images = accelerator.to_device(torch.randn(batch, 3, size, size))
    targets = torch.randint(0, CLASSES, (batch,)).to(accelerator.device)
    with accelerator.autocast():
        loss = torch.nn.functional.cross_entropy(model(images).float(), targets,
                                                 label_smoothing=0.1)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def amp_rates(ctx: Context, clock: Clock, notes: list[str]) -> list[dict]:
    """Bare-loop images/s at each precision."""
    plan, rows = ctx.plan, []
    for precision in plan.precisions:
        if not clock.allows(10 if not plan.dry_run else 1):
            notes.append(f"AMP {precision}: skipped ({clock.left():.0f} s left)")
            continue
        accelerator = Accelerator.create(plan.device, precision)
        rate = bare_images_per_s(plan.train_arch, "imagenet", CLASSES, plan.train_batch,
                                 plan.train_size, accelerator, plan.train_steps)
        rows.append({"arch": plan.train_arch, "image_size": plan.train_size,
                     "batch": plan.train_batch, "precision": accelerator.precision_name,
                     "images_per_s": round(rate, 1)})
        release_cuda_cache()
    return rows


def peak_memory(ctx: Context, clock: Clock, notes: list[str]) -> list[dict]:
    """One step at each distinct batch of docs/training.md's table; each against its rows."""
    plan = ctx.plan
    claims = read_claims()
    cap = plan.memory_batch_cap
    runs: dict[tuple[str, bool, int], list[BatchClaim]] = {}
    for claim in claims:
        runs.setdefault((claim.arch, claim.amp, min(claim.batch, cap or claim.batch)),
                        []).append(claim)
    rows = []
    for (arch, amp, batch), its_claims in sorted(runs.items()):
        smallest = min(c.gpu_gib for c in its_claims)
        row = {"arch": arch, "amp": amp, "batch": batch, "image_size": plan.memory_size,
               "smallest_gpu_gib": smallest, "budget_gib": round((1 - HEADROOM) * smallest, 1)}
        if not clock.allows(4 if not plan.dry_run else 0.5):
            notes.append(f"peak memory {arch} batch {batch}: skipped ({clock.left():.0f} s left)")
            continue
        accelerator = Accelerator.create(plan.device, "auto" if amp else "fp32")
        if amp and accelerator.amp_dtype is None:  # the CPU: bf16 stands in, as fit's --amp
            accelerator = Accelerator.create(plan.device, "bf16")
        row["precision"] = accelerator.precision_name
        try:
            peak = step_peak_bytes(arch, batch, plan.memory_size, accelerator)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            release_cuda_cache()
            row.update(peak_gib=None, fits=False, error="out of memory")
        else:
            row["peak_gib"] = None if peak is None else round(peak / GIB, 2)
            row["fits"] = None if peak is None else peak <= row["budget_gib"] * GIB
        rows.append(row)
    return rows


def fit_rate(ctx: Context, clock: Clock) -> dict:
    """`python -m bench.train` (synth, fit, the bare loop) within what the clock has left."""
    plan = ctx.plan
    if plan.fit_args is None:
        return {"status": "skipped", "reason": "not in a dry run (three interpreters and a "
                "real fit cost about 20 s of CPU); `python -m bench.train` is what runs"}
    command = [PYTHON, "-m", "bench.train", "--arch", plan.train_arch, "--image-size",
               str(plan.train_size), "--weights", "none", "--device", plan.device,
               *plan.fit_args]
    limit = clock.left()
    if limit < (20 if not plan.dry_run else 5):
        return {"status": "skipped", "reason": f"{limit:.0f} s left", "command": command}
    started = time.monotonic()
    done = run_bounded(command, limit, ctx.work_dir)
    if done is None:
        return {"status": "skipped", "reason": f"did not finish in the {limit:.0f} s left",
                "command": command}
    (ctx.out_dir / "training-fit.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"status": "failed", "error": done.stderr.strip()[-500:], "command": command}
    result = last_json(done.stdout)
    return {"status": "ok", "command": command, "seconds": round(time.monotonic() - started, 1),
            **{k: result.get(k) for k in ("arch", "image_size", "batch_size", "precision",
                                          "fit_images_per_s", "bare_images_per_s", "ratio")}}


def last_json(text: str) -> dict:
    """The last JSON object printed at the start of a line (bench.emit's output)."""
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for start in reversed(starts):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON object in the output: {text[-300:]!r}")


def run(ctx: Context, clock: Clock) -> dict:
    """AMP speed and peak memory (`fit` is a step of its own, run last)."""
    notes: list[str] = []
    amp = amp_rates(ctx, clock, notes)
    memory = peak_memory(ctx, clock, notes)
    return {"status": "ok", "amp": amp, "memory": memory, "notes": notes,
            "headroom": HEADROOM}
