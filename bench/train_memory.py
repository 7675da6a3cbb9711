"""Training memory per image: the tensors autograd saves for backward, and the fixed cost.

    OMP_NUM_THREADS=1 python -m bench.train_memory --markdown     # the tables of docs/benchmarks.md
    python -m bench.train_memory --archs resnet50 --sizes 384      # JSON on stdout

For each architecture, crop and precision, one training forward (train mode, channels_last,
cross-entropy with label smoothing, as `training fit` runs it) is taken at batch 1, 2 and 4
under `torch.autograd.graph.saved_tensors_hooks`; every saved tensor's storage is counted once
(by its data pointer), parameters left out. The slope between batch 1 and 4 is the memory one
more image costs; batch 2 checks that the growth is linear. The fixed cost is the weights,
their gradients and AdamW's two moments (4 x params x 4 bytes, fp32 master weights under
autocast too) plus what is saved whatever the batch (the low-precision weight copies autocast
keeps for backward). bf16 autocast on the CPU stands in for CUDA AMP: fp16 and bf16 are both
2 bytes, so the saved sizes are the same. Nothing is timed and no GPU is needed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bench.common import emit, environment
from models.architectures import build

logger = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet50")
SIZES = (224, 512)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
BATCHES = (1, 2, 4)  # the slope is taken from the first and last; the middle checks linearity
GPU_GIB = (8, 12, 16, 24, 40, 80, 141)
HEADROOM = 0.25  # share of the GPU left to the CUDA context, caching allocator, cuDNN, backward
FIXED_BYTES_PER_PARAM = 4 * 4  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
MIB = 2**20
GIB = 2**30


def saved_bytes(model: nn.Module, batch: int, size: int, dtype: torch.dtype | None,
                num_classes: int = 10) -> int:
    """Bytes of the distinct storages (parameters excluded) that one training forward of
    `batch` images of `size` px saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, size, size, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, num_classes, (batch,), generator=generator)
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        loss = nn.functional.cross_entropy(model(images).float(), targets, label_smoothing=0.1)
    del loss  # the graph and its saved tensors go with it
    return sum(storages.values())


@dataclass(frozen=True)
class MemoryRow:
    """One architecture at one crop and precision: measured bytes and what they imply."""

    arch: str
    image_size: int
    precision: str
    params: int
    saved: dict[int, int]  # batch -> saved bytes

    @property
    def per_image(self) -> float:
        """Saved bytes one more image adds (slope between the smallest and largest batch)."""
        low, high = min(self.saved), max(self.saved)
        return (self.saved[high] - self.saved[low]) / (high - low)

    @property
    def batch_independent(self) -> float:
        """Saved bytes at batch 0 on that line: autocast's weight copies, ~0 in fp32."""
        low = min(self.saved)
        return self.saved[low] - low * self.per_image

    @property
    def linearity_error(self) -> float:
        """Largest relative gap between a measured batch and the line (0: exactly linear)."""
        return max(abs(b * self.per_image + self.batch_independent - v) / v
                   for b, v in self.saved.items())

    @property
    def fixed(self) -> float:
        """Bytes a step needs whatever the batch: weights, gradients, AdamW, weight copies."""
        return FIXED_BYTES_PER_PARAM * self.params + self.batch_independent

    def largest_batch(self, gib: float, headroom: float = HEADROOM) -> int:
        """The largest power-of-two batch whose step fits `gib` GiB less the headroom (0: none)."""
        room = gib * GIB * (1.0 - headroom) - self.fixed
        batch = 0
        while self.per_image * (batch * 2 or 1) <= room:
            batch = batch * 2 or 1
        return batch

    def to_dict(self, headroom: float = HEADROOM) -> dict[str, Any]:
        """Plain values, with the derived figures and batch sizes, for JSON."""
        return {**asdict(self), "per_image_mib": round(self.per_image / MIB, 2),
                "batch_independent_mib": round(self.batch_independent / MIB, 2),
                "fixed_mib": round(self.fixed / MIB, 1),
                "linearity_error": round(self.linearity_error, 5),
                "largest_batch": {f"{g}GiB": self.largest_batch(g, headroom) for g in GPU_GIB}}


def measure(arch: str, image_size: int, precision: str) -> MemoryRow:
    """Saved bytes for `arch` (10 classes, ImageNet stem, random weights) at every batch."""
    torch.manual_seed(0)
    model = build(arch, num_classes=10, weights="none", stem="imagenet")
    model = model.to(memory_format=torch.channels_last).train()
    params = sum(p.numel() for p in model.parameters())
    saved = {b: saved_bytes(model, b, image_size, PRECISIONS[precision]) for b in BATCHES}
    row = MemoryRow(arch, image_size, precision, params, saved)
    logger.info("%s %d px %s: %.1f MiB saved per image, linear within %.2g%%", arch,
                image_size, precision, row.per_image / MIB, 100 * row.linearity_error)
    return row


def markdown(rows: list[MemoryRow], headroom: float = HEADROOM) -> str:
    """The measured table and the largest power-of-two batch per GPU size."""
    gpus = " | ".join(f"{g} GiB" for g in GPU_GIB)
    lines = ["| arch | crop | precision | saved per image (MiB) | linear within | "
             f"fixed (MiB) | {gpus} |",
             "|---|---|---|---|---|---|" + "---|" * len(GPU_GIB)]
    for r in rows:
        batches = " | ".join(str(r.largest_batch(g, headroom)) for g in GPU_GIB)
        lines.append(f"| {r.arch} | {r.image_size} | {r.precision} | {r.per_image / MIB:.1f} | "
                     f"{100 * r.linearity_error:.3f}% | {r.fixed / MIB:.0f} | {batches} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[MemoryRow]:
    """Measure every architecture x crop x precision; JSON (or --markdown) on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--headroom", type=float, default=HEADROOM,
                        help="share of GPU memory kept free when sizing batches")
    parser.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    args = parser.parse_args(argv)
    rows = [measure(arch, int(size), precision)
            for arch in args.archs.split(",") for size in args.sizes.split(",")
            for precision in args.precisions.split(",")]
    if args.markdown:
        print(markdown(rows, args.headroom))
    else:
        emit({"env": environment(), "headroom": args.headroom,
              "rows": [r.to_dict(args.headroom) for r in rows]})
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
