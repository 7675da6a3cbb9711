"""bf16 vs fp32 on real photos: top-1 agreement and the largest score difference.

    python -m bench.parity --checkpoint checkpoints/pets      # or --arch resnet50 (random weights)

bf16 autocast is only offered on the CPU with this check recorded beside its speed.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from bench.common import benchmark_checkpoint, emit, environment, web_jpegs
from bench.raw import model_images_per_s
from models.checkpoint import load
from models.decoding import decode
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import eval_transform

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    """Compare precisions on the same model and photos; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    path = args.checkpoint or benchmark_checkpoint(args.arch)
    fp32 = Predictor(*load(path), Accelerator.create(args.device, "fp32"))
    low = Predictor(*load(path), Accelerator.create(args.device, args.precision))
    transform = eval_transform(fp32.card.preprocessing)
    batch = torch.stack([transform(decode(b)) for b in web_jpegs(28)])
    a, b = fp32.probabilities(batch), low.probabilities(batch)
    result = {
        "env": environment(), "arch": fp32.card.arch, "precision": args.precision,
        "images": len(batch),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
        "max_abs_score_diff": float((a - b).abs().max()),
        "fp32_images_per_s": round(model_images_per_s(fp32, args.batch_size, args.seconds), 2),
        f"{args.precision}_images_per_s": round(
            model_images_per_s(low, args.batch_size, args.seconds), 2),
    }
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
