"""Command line: `python -m training fit|evaluate|synth|import-torchvision`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from models.architectures import (
    ARCHITECTURES,
    STEMS,
    UnknownArchitectureError,
    WeightsUnavailableError,
)
from models.checkpoint import CheckpointError
from models.device import DEVICE_CHOICES, DeviceUnavailableError
from models.preprocessing import DEFAULT_MAX_PIXELS
from training.config import TrainConfig
from training.errors import TrainingError

logger = logging.getLogger("training")

USER_ERRORS = (TrainingError, CheckpointError, WeightsUnavailableError, DeviceUnavailableError,
               UnknownArchitectureError)


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train a classifier and export a checkpoint",
                       description="Fine-tune (or train from scratch) and export to --output.")
    p.add_argument("data", type=Path, help="class-folder tree, or a CSV with image,labels")
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--val", type=Path, help="validation data (same layout); else a split")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--task", choices=["single", "multi"], help="override the inferred task")
    p.add_argument("--arch", default="resnet50", choices=list(ARCHITECTURES))
    p.add_argument("--weights", default="imagenet",
                   help="imagenet | none | path to a .pth/.safetensors state dict")
    p.add_argument("--stem", default="auto", choices=["auto", *STEMS],
                   help="auto: small-image stem when training from scratch at <= 96 px")
    p.add_argument("--image-size", type=int, default=224, help="training crop size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--freeze-epochs", type=int, default=0, help="head-only warm-up epochs")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--lr", type=float, help="head LR (default 1e-3 fine-tuning, 2e-3 scratch)")
    p.add_argument("--backbone-lr-scale", type=float,
                   help="backbone LR = lr x this (default 0.1 fine-tuning, 1.0 scratch)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, help="default min(1, 0.1 x epochs)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-scale", type=float, help="RandomResizedCrop min area (default: auto)")
    p.add_argument("--trivial-augment", type=float,
                   help="share of images given TrivialAugmentWide (default: auto)")
    p.add_argument("--eval-resize-ratio", type=float, help="eval resize / crop (default: auto)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16/fp16 autocast on CUDA (no effect on the CPU)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without gain")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="LAST_PT",
                   help="continue from OUTPUT/last.pt (or the given file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint already in --output (refused otherwise)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="decoding budget per image; larger JPEGs are decoded reduced, other "
                        "larger images skipped")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _add_others(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="metrics of a checkpoint on labelled data, as JSON")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("data", type=Path)
    e.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0)
    e.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--confusion-matrix", action="store_true",
                   help="include the confusion matrix in the JSON")
    e.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="decoding budget per image (as for fit)")
    s = sub.add_parser("synth", help="write a generated, learnable dataset")
    s.add_argument("out", type=Path)
    s.add_argument("--task", choices=["single", "multi"], default="single")
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--per-class", type=int, default=200)
    s.add_argument("--classes", type=int, help="number of shape classes (max 6)")
    s.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("import-torchvision", help="export torchvision's ImageNet classifier")
    i.add_argument("--arch", default="resnet50", choices=list(ARCHITECTURES))
    i.add_argument("--output", type=Path, required=True)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fit(sub)
    _add_others(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Map parsed `fit` arguments onto a TrainConfig."""
    resume = None
    if args.resume is not None:
        resume = args.output / "last.pt" if args.resume == "auto" else Path(args.resume)
    return TrainConfig(
        data=args.data, output=args.output, val=args.val, task=args.task,
        val_fraction=args.val_fraction, arch=args.arch, weights=args.weights, stem=args.stem,
        image_size=args.image_size, epochs=args.epochs, freeze_epochs=args.freeze_epochs,
        batch_size=args.batch_size, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing, min_scale=args.min_scale,
        trivial_augment=args.trivial_augment, eval_resize_ratio=args.eval_resize_ratio,
        device=args.device, workers=args.workers, seed=args.seed, amp=args.amp,
        patience=args.patience, resume=resume, overwrite=args.overwrite,
        max_pixels=args.max_pixels, progress=args.progress)


def _run(args: argparse.Namespace) -> int:
    if args.command == "fit":
        from training.distributed import dist_info_from_env
        from training.fit import fit

        fit(config_from_args(args), dist_info_from_env(dict(os.environ)))
    elif args.command == "evaluate":
        from training.evaluation import evaluate_checkpoint

        metrics = evaluate_checkpoint(args.checkpoint, args.data, device=args.device,
                                      batch_size=args.batch_size, workers=args.workers,
                                      amp=args.amp, max_pixels=args.max_pixels)
        if not args.confusion_matrix:
            metrics.pop("confusion_matrix", None)
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    elif args.command == "synth":
        from training.synthetic import generate

        path = generate(args.out, task=args.task, size=args.size, per_class=args.per_class,
                        seed=args.seed, classes=args.classes)
        logger.info("dataset ready: %s", path)
    else:
        from training.export import import_torchvision

        import_torchvision(args.arch, args.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging to stderr, run; user errors become one line and exit code 1.

    User errors are the specific types in USER_ERRORS (with -v their traceback is logged at
    debug level); anything else is a bug and propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _run(args)
    except USER_ERRORS as exc:
        logger.error("%s", " ".join(str(exc).split()) or type(exc).__name__)
        logger.debug("where it was raised", exc_info=True)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
