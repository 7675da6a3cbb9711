"""Command line: `python -m training fit|evaluate|predict|synth|import-torchvision|import-cifar|
compare`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from models.architectures import UnknownArchitectureError, WeightsUnavailableError
from models.checkpoint import CheckpointError
from models.device import DeviceUnavailableError
from training.commands.predict.options import PredictConfig
from training.config import (
    CifarImportConfig,
    CompareConfig,
    EvaluateConfig,
    ImportConfig,
    SynthConfig,
    TrainConfig,
)
from training.exceptions import TrainingError
from training.options import add_options, from_args

logger = logging.getLogger("training")

USER_ERRORS = (TrainingError, CheckpointError, WeightsUnavailableError, DeviceUnavailableError,
               UnknownArchitectureError)


def _fit(cfg: TrainConfig) -> None:
    from training.distributed import dist_info_from_env
    from training.fit import fit

    fit(cfg, dist_info_from_env(dict(os.environ)))


def _evaluate(cfg: EvaluateConfig) -> None:
    from training.commands.evaluate import evaluate_checkpoint

    sys.stdout.write(json.dumps(evaluate_checkpoint(cfg), indent=2) + "\n")


def _synth(cfg: SynthConfig) -> None:
    from training.commands.synth import generate

    logger.info("dataset ready: %s", generate(cfg))


def _import_torchvision(cfg: ImportConfig) -> None:
    from training.commands.import_torchvision import import_torchvision

    import_torchvision(cfg)


def _import_cifar(cfg: CifarImportConfig) -> None:
    from training.commands.import_cifar import import_cifar

    logger.info("dataset ready: %s", import_cifar(cfg))


def _predict(cfg: PredictConfig) -> None:
    from training.commands.predict.run import predict
    from training.distributed import dist_info_from_env

    predict(cfg, dist_info_from_env(dict(os.environ)))


def _compare(cfg: CompareConfig) -> None:
    from training.commands.compare import compare

    compare(cfg)


@dataclass(frozen=True)
class Command:
    """A subcommand: its options (a config dataclass), what runs it, and its help."""

    config: type
    run: Callable[[Any], None]  # imports its module only when called
    help: str
    description: str | None = None


COMMANDS = {
    "fit": Command(TrainConfig, _fit, "train a classifier and export a checkpoint",
                   "Fine-tune (or train from scratch) and export to --output."),
    "evaluate": Command(EvaluateConfig, _evaluate,
                        "metrics of a checkpoint on labelled data, as JSON"),
    "synth": Command(SynthConfig, _synth, "write a generated, learnable dataset"),
    "import-torchvision": Command(ImportConfig, _import_torchvision,
                                  "export torchvision's ImageNet classifier"),
    "import-cifar": Command(CifarImportConfig, _import_cifar,
                            "convert the binary CIFAR-10/100 files into PNG class folders",
                            "Read cifar-10-batches-bin or cifar-100-binary (never the pickled "
                            "version) into OUT/train/<class>/*.png and OUT/test/<class>/*.png."),
    "predict": Command(PredictConfig, _predict, "classify every image of folders or lists into "
                       "a JSON Lines or CSV file, resumably", "Run CHECKPOINT on every image "
                       "of the SOURCEs (as the server's /predict would) and write one row per "
                       "image into --output; run it again to continue an interrupted run."),
    "compare": Command(CompareConfig, _compare, "compare fit runs: curves, a table, confusion "
                       "matrices", "Read RUN_DIRs written by fit (same task, same classes) and "
                       "write curves.png, compare.json, compare.md and confusion_matrices.png "
                       "into --output."),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand, generated from its config's fields."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        add_options(sub.add_parser(name, help=command.help, description=command.description),
                    command.config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging to stderr, run; user errors become one line and exit code 1.

    User errors are the specific types in USER_ERRORS (with -v their traceback is logged at
    debug level); anything else is a bug and propagates with its traceback. A config that
    refuses its values is a user error too: it is built inside the same guard.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command = COMMANDS[args.command]
    try:
        command.run(from_args(command.config, args))
        return 0
    except USER_ERRORS as exc:
        logger.error("%s", " ".join(str(exc).split()) or type(exc).__name__)
        logger.debug("where it was raised", exc_info=True)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
