"""Model-only images/s: the service's Predictor on ready uint8 batches, eager and compiled.

Each figure is `Predictor.outputs` as the batcher calls it: a uint8 batch on the host, pinned
and copied to the device, normalised there, channels_last, autocast at the precision, logits
copied back. torch.compile wraps the runner's network with the default dynamic-shape rule:
the first batch size compiles a static graph, the next one a graph with a dynamic batch
dimension that the larger sizes reuse, so `first_call_s` shows both compiles.
"""

from __future__ import annotations

import logging
import time

import torch

from bench.common import images_per_s
from bench.gpu.context import Context
from bench.gpu.plan import Clock
from models.device import release_cuda_cache
from models.predict import Predictor

logger = logging.getLogger(__name__)


def _batch(predictor: Predictor, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randint(0, 256, (size, *predictor.input_shape), dtype=torch.uint8,
                         generator=generator)


def _point_seconds(ctx: Context) -> float:
    """About how long one batch size takes to measure (warm-up included)."""
    return 2 * ctx.plan.model_seconds + (0.5 if not ctx.plan.dry_run else 0.0)


def measure(predictor: Predictor, ctx: Context, clock: Clock, notes: list[str],
            label: str) -> tuple[dict[int, float], dict[int, float]]:
    """images/s and the first call's seconds at each batch size the clock allows."""
    rates: dict[int, float] = {}
    first: dict[int, float] = {}
    for size in ctx.plan.batch_sizes:
        if not clock.allows(_point_seconds(ctx)):
            notes.append(f"{label}: batch {size} and up skipped ({clock.left():.0f} s left)")
            break
        batch = _batch(predictor, size)
        started = time.perf_counter()
        predictor.outputs(batch)
        first[size] = round(time.perf_counter() - started, 3)
        rates[size] = round(images_per_s(predictor.outputs, batch, ctx.plan.model_seconds), 1)
    return rates, first


def eager(ctx: Context, clock: Clock) -> dict:
    """Every arch x precision x batch size, eager."""
    rows, notes = [], []
    for arch in ctx.plan.archs:
        for precision in ctx.plan.precisions:
            predictor = ctx.predictor(arch, precision)
            rates, _ = measure(predictor, ctx, clock, notes, f"{arch} {precision} eager")
            rows.append({"arch": arch, "precision": predictor.accelerator.precision_name,
                         "mode": "eager", "images_per_s": rates})
            del predictor
            release_cuda_cache()
    return {"status": "ok", "rows": rows, "notes": notes,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def compiled(ctx: Context, clock: Clock) -> dict:
    """The same through torch.compile, the most useful configurations first, each only when
    its compile (timed on the first) still fits."""
    import torch._dynamo

    rows, notes, errors = [], [], []
    needs = 2 * ctx.plan.compile_estimate_s  # a static graph, then a dynamic one
    for precision in ctx.plan.precisions:  # bf16 first: what `auto` picks on an H100/H200
        for arch in ctx.plan.archs:
            label = f"{arch} {precision} torch.compile"
            if not clock.allows(needs):
                notes.append(f"{label}: skipped, it needs about {needs:.0f} s and "
                             f"{max(0.0, clock.left()):.0f} s are left")
                continue
            started = time.monotonic()
            try:
                rows.append(_compiled_row(ctx, clock, notes, arch, precision, label))
            except Exception as exc:  # noqa: BLE001 - one configuration; the others still run
                logger.exception("%s failed", label)
                errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
            torch._dynamo.reset()
            release_cuda_cache()
            needs = time.monotonic() - started  # the next configuration costs about as much
    return {"status": "failed" if errors else "ok", "rows": rows, "notes": notes,
            "backend": ctx.plan.compile_backend, **({"error": "; ".join(errors)} if errors
                                                    else {})}


def _compiled_row(ctx: Context, clock: Clock, notes: list[str], arch: str, precision: str,
                  label: str) -> dict:
    """One configuration: the runner's network through torch.compile, then `measure`."""
    import torch._dynamo

    torch._dynamo.reset()
    predictor = ctx.predictor(arch, precision)
    predictor.run.model = torch.compile(predictor.run.model, backend=ctx.plan.compile_backend)
    rates, first = measure(predictor, ctx, clock, notes, label)
    return {"arch": arch, "precision": predictor.accelerator.precision_name,
            "mode": f"torch.compile ({ctx.plan.compile_backend})", "images_per_s": rates,
            "first_call_s": first}
