"""Which thread loads a model and which one runs it: the OpenMP effect behind app.serving.compute.

    python -m bench.threads --arch resnet34 --repeats 3

Each placement runs in a fresh process (OpenMP state is per process) and reports the median
ms of a batch-1 forward pass through the service's Predictor:

- main-loads: loaded on the main thread, run on a second, living thread (as the service
  did before: two OpenMP teams alive, so libgomp stops spinning between parallel regions);
- same-thread: loaded and run on one worker thread;
- service: loaded on a thread that has exited by the time a second thread runs it (as the
  service does now: loading thread, then the compute thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.common import benchmark_checkpoint, emit, environment

logger = logging.getLogger(__name__)
PLACEMENTS = ("main-loads", "same-thread", "service")


def _forward_ms(checkpoint: str, placement: str, runs: int) -> float:
    from models.checkpoint import load
    from models.device import Accelerator
    from models.predict import Predictor

    def setup() -> Predictor:
        model, card = load(checkpoint)
        return Predictor(model, card, Accelerator.create("cpu", "fp32"))

    def measure(predictor: Predictor) -> float:
        x = torch.randint(0, 256, (1, *predictor.input_shape), dtype=torch.uint8)
        for _ in range(3):
            predictor.probabilities(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            predictor.probabilities(x)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    worker = ThreadPoolExecutor(1)
    if placement == "main-loads":
        predictor = setup()
    elif placement == "same-thread":
        predictor = worker.submit(setup).result()
    else:
        box: list[Predictor] = []
        loader = threading.Thread(target=lambda: box.append(setup()))
        loader.start()
        loader.join()
        predictor = box[0]
    return worker.submit(measure, predictor).result()


def main(argv: list[str] | None = None) -> dict:
    """Measure each placement `repeats` times, alternating, each in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=40, help="timed forward passes per process")
    parser.add_argument("--child", choices=PLACEMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(_forward_ms(args.checkpoint, args.child, args.runs)) + "\n")
        return {}
    checkpoint = str(args.checkpoint or benchmark_checkpoint(args.arch))
    results: dict[str, list[float]] = {p: [] for p in PLACEMENTS}
    for _ in range(args.repeats):
        for placement in PLACEMENTS:
            out = subprocess.run(
                [sys.executable, "-m", "bench.threads", "--child", placement,
                 "--checkpoint", checkpoint, "--runs", str(args.runs)],
                check=True, capture_output=True, text=True).stdout
            results[placement].append(round(json.loads(out.splitlines()[-1]), 1))
    result = {"env": environment(), "arch": args.arch, "batch": 1, "forward_ms": results,
              "median_ms": {p: statistics.median(v) for p, v in results.items()}}
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main()
