"""JPEG decode + resize + crop: nvJPEG on the device against Pillow on the host, same JPEGs.

The device path is the service's own (models.device_decode.DeviceJpegDecoder: the header read
on the host, one nvJPEG call per batch, resize and crop on the device, the crops copied back);
the host path is models.decoding with the eval transform, one image at a time on one thread,
as a decode process runs it. CPU per image is this process's CPU time (every thread, the
CUDA runtime's included) over the images decoded.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from bench.gpu.context import Context
from bench.gpu.plan import Clock
from models.decoding import DEFAULT_MAX_PIXELS, decode
from models.device_decode import CpuFallback, DeviceJpegDecoder
from models.preprocessing import eval_transform

logger = logging.getLogger(__name__)


def timed(fn: Callable[[list[bytes]], Sequence[object]], jpegs: list[bytes], batch: int,
          seconds: float) -> dict:
    """img/s and CPU ms per image of `fn` on rotating batches: one warm-up call, then calls
    for at least `seconds` and two batches."""
    fn(jpegs[:batch])
    done = index = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds or done < 2 * batch:
        fn([jpegs[(index + j) % len(jpegs)] for j in range(batch)])
        done, index = done + batch, index + batch
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"batch": batch, "images_per_s": round(done / wall, 1),
            "cpu_ms_per_image": round(1000 * cpu / done, 3)}


def run(ctx: Context, clock: Clock) -> dict:
    """Both decoders at each batch size the plan names, while the clock allows."""
    plan = ctx.plan
    pre = ctx.preprocessing(plan.server_arch)
    jpegs = ctx.jpegs(plan.decode_images)[:plan.decode_images]
    device = torch.device(plan.device)
    decoder = DeviceJpegDecoder(device, pre, DEFAULT_MAX_PIXELS)
    decoder.warm_up()
    fallbacks = [r.reason for r in decoder.decode(jpegs) if isinstance(r, CpuFallback)]
    transform = eval_transform(pre)

    def host(batch: list[bytes]) -> list[torch.Tensor]:
        return [transform(decode(data, target_size=pre.resize)) for data in batch]

    rows, notes = [], []
    for name, fn, batches in ((f"nvJPEG on {device}" if device.type == "cuda"
                               else f"device decoder on {device}", decoder.decode,
                               plan.decode_batches),
                              ("Pillow, one thread", host, (1,))):
        for batch in batches:
            if not clock.allows(2 * plan.decode_seconds + 0.5):
                notes.append(f"{name} at batch {batch}: skipped ({clock.left():.0f} s left)")
                continue
            rows.append({"decoder": name, **timed(fn, jpegs, batch, plan.decode_seconds)})
    return {"status": "ok", "rows": rows, "notes": notes, "images": len(jpegs),
            "sizes": sorted({_size(data) for data in jpegs}), "resize": pre.resize,
            "crop": pre.crop, "fallbacks": fallbacks,
            "torch_threads": torch.get_num_threads()}


def _size(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return f"{image.width}x{image.height}"
