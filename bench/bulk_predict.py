"""Bulk prediction against the model alone: `training predict`'s images/s over a folder of
web-size JPEGs, and the model's own images/s on ready-made crops at the same batch size.

    python -m bench.bulk_predict --arch resnet50 --batch-size 32 --images 256 --rounds 3

`predict` decodes in DataLoader worker processes while the model runs, so on the CPU the
decoding competes with the model for the cores; the ratio says what that costs. Its rate is
the one it logs for its own loop (decoding, the model, labels and the fsync'ed rows), model
loading excluded; the whole command's wall time is reported beside it.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import benchmark_checkpoint, emit, environment, images_per_s, web_jpegs
from models import checkpoint
from models.device import Accelerator
from models.predict import Predictor
from models.preprocessing import EvalCrop, crop_tensor
from training.commands.predict.options import PredictConfig
from training.commands.predict.run import predict

logger = logging.getLogger("bench.bulk_predict")


def model_only(directory: Path, jpegs: list[bytes], batch_size: int, seconds: float) -> float:
    """Images/s of Predictor.outputs on one batch of real crops, already decoded."""
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    crop = EvalCrop(card.preprocessing)
    batch = torch.stack([crop_tensor(crop(jpegs[i % len(jpegs)], 40_000_000))
                         for i in range(batch_size)])
    return images_per_s(predictor.outputs, batch, seconds)


def cpu_ms_per_image(directory: Path, jpegs: list[bytes], batch_size: int) -> dict[str, float]:
    """CPU time (all of this process's threads) per image of decoding and cropping alone (one
    thread, as in a decoding process) and of the model alone: on a machine whose cores are all
    busy, `predict` can keep at most model / (model + decode) of the model's rate, whatever
    else runs there."""
    model, card = checkpoint.load(directory)
    predictor = Predictor(model, card, Accelerator.create("cpu", "fp32"))
    crop = EvalCrop(card.preprocessing)
    started = time.process_time()
    crops = [crop_tensor(crop(jpegs[i % len(jpegs)], 40_000_000)) for i in range(batch_size)]
    decode = (time.process_time() - started) / batch_size
    batch = torch.stack(crops)
    predictor.outputs(batch)  # warm-up
    started = time.process_time()
    for _ in range(3):
        predictor.outputs(batch)
    run = (time.process_time() - started) / (3 * batch_size)
    return {"decode": round(decode * 1000, 2), "model": round(run * 1000, 2),
            "bound": round(run / (run + decode), 3)}


def bulk(directory: Path, folder: Path, output: Path, *, batch_size: int,
         workers: int) -> dict[str, float]:
    """One `predict` run over `folder`: its own images/s, and the whole call's."""
    output.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = predict(PredictConfig(checkpoint=directory, sources=[folder], output=output,
                                    device="cpu", amp=False, batch_size=batch_size,
                                    workers=workers, progress=False))
    wall = time.perf_counter() - started
    return {"rows": summary.rows, "errors": summary.errors,
            "images_per_s": round(summary.new_rows / summary.seconds, 2),
            "wall_images_per_s": round(summary.rows / wall, 2)}


def main() -> None:
    """Alternate the two measurements (the machine may be shared): the model alone, then
    `predict`, `--rounds` times, then the model alone once more; each round's ratio is its
    `predict` rate over the mean of the model's rates just before and after it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="predict's decoding processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long the model alone is timed, each time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    directory = benchmark_checkpoint(args.arch, work)
    jpegs = web_jpegs()
    folder = work / "photos"
    folder.mkdir()
    for i in range(args.images):
        (folder / f"photo-{i:05d}.jpg").write_bytes(jpegs[i % len(jpegs)])
    cpu = cpu_ms_per_image(directory, jpegs, args.batch_size)
    logger.info("CPU ms per image: %s", cpu)
    alone = [model_only(directory, jpegs, args.batch_size, args.seconds)]
    runs = []
    for _ in range(args.rounds):
        logger.info("model alone: %.2f images/s", alone[-1])
        runs.append(bulk(directory, folder, work / "rows.jsonl", batch_size=args.batch_size,
                         workers=args.workers))
        logger.info("predict: %s", runs[-1])
        alone.append(model_only(directory, jpegs, args.batch_size, args.seconds))
    ratios = [run["images_per_s"] / ((alone[i] + alone[i + 1]) / 2)
              for i, run in enumerate(runs)]
    emit({"environment": environment(), "arch": args.arch, "batch_size": args.batch_size,
          "images": args.images, "workers": args.workers,
          "model_only_images_per_s": [round(rate, 2) for rate in alone],
          "predict": runs, "ratios": [round(r, 3) for r in ratios],
          "median_ratio": round(statistics.median(ratios), 3), "cpu_ms_per_image": cpu,
          "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
