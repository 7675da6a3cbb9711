"""The ceiling: the model alone on ready tensors, and the whole single-process pipeline.

    python -m bench.raw --arch resnet50 --batch-sizes 1,8,16,32,64 --seconds 5

Uses the service's own Predictor (normalize on device, channels_last, autocast) and its own
decode + eval transform, on the same model and preprocessing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from bench.common import benchmark_checkpoint, emit, environment, images_per_s, web_jpegs
from models.backend_specs import BACKENDS, backend_device
from models.card import Preprocessing
from models.checkpoint import load
from models.decoding import decode
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import eval_transform

logger = logging.getLogger(__name__)


def model_images_per_s(predictor: Predictor, batch_size: int, seconds: float) -> float:
    """Images/s of Predictor.probabilities on a ready uint8 batch."""
    batch = torch.randint(0, 256, (batch_size, *predictor.input_shape), dtype=torch.uint8)
    return images_per_s(predictor.probabilities, batch, seconds)


def pipeline_images_per_s(predictor: Predictor, jpegs: list[bytes], batch_size: int,
                          seconds: float) -> tuple[float, float]:
    """Images/s of decode -> transform -> model in one process, and ms per single image."""
    pre = predictor.card.preprocessing
    transform = eval_transform(pre)

    def run(images: list[bytes]) -> None:
        tensors = [transform(decode(b, target_size=pre.resize)) for b in images]
        predictor.probabilities(torch.stack(tensors))

    run(jpegs[:batch_size])
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2 * batch_size:
        chunk = [jpegs[(i + j) % len(jpegs)] for j in range(batch_size)]
        run(chunk)
        done, i = done + batch_size, i + batch_size
    throughput = done / (time.perf_counter() - start)
    singles = []
    for b in jpegs[:20]:
        t0 = time.perf_counter()
        run([b])
        singles.append(time.perf_counter() - t0)
    singles.sort()
    return throughput, 1000 * singles[len(singles) // 2]


def preprocess_images_per_s(pre: Preprocessing, jpegs: list[bytes], seconds: float) -> float:
    """Images/s of decode + eval transform alone, on one thread (the CPU side of serving)."""
    transform = eval_transform(pre)

    def run(images: list[bytes]) -> None:
        for data in images:
            transform(decode(data, target_size=pre.resize))

    return images_per_s(run, jpegs, seconds)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--checkpoint", help="use this checkpoint instead of random weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backend", default="torch", choices=BACKENDS)
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, card = load(args.checkpoint or benchmark_checkpoint(args.arch))
    accelerator = Accelerator.create(backend_device(args.backend, args.device), args.precision)
    predictor = Predictor(model, card, accelerator,
                          backend=args.backend, threads=args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model_only = {b: round(model_images_per_s(predictor, b, args.seconds), 2) for b in sizes}
    best = max(model_only, key=model_only.get)
    pipe, single_ms = pipeline_images_per_s(predictor, web_jpegs(), best, args.seconds)
    preprocess = preprocess_images_per_s(card.preprocessing, web_jpegs(), min(args.seconds, 3.0))
    result = {
        "env": environment(), "arch": card.arch, "crop": card.preprocessing.crop,
        "precision": predictor.accelerator.precision_name, "backend": predictor.backend,
        "model_images_per_s": model_only, "best_batch": best,
        "ceiling_images_per_s": model_only[best],
        "pipeline_images_per_s": round(pipe, 2), "pipeline_single_image_ms": round(single_ms, 2),
        "preprocess_images_per_s_one_thread": round(preprocess, 1),
    }
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
