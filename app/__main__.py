"""`python -m app`: parse flags (over RESNET_SERVE_* variables), configure logging, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Literal, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app.allocator import reexec_with_fast_allocator
from app.cluster import workers_for
from app.config import ENV_PREFIX, Settings
from app.logs import configure_logging
from app.server import WorkerEntry, serve
from models.backend_specs import backend_device

logger = logging.getLogger("app")

_FLAG_NAMES = {"api_keys": "--api-key"}


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field; unset flags fall back to the environment, then defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve image-classification checkpoints over HTTP with dynamic batching. "
                    f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>.")
    for name, field in Settings.model_fields.items():
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        env = ENV_PREFIX + name.upper()
        default = "" if field.is_required() else f"; default {_show_default(name, field)}"
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS,
                        "help": f"{field.description} [env {env}{default}]"}
        annotation = field.annotation
        if name == "api_keys":
            kwargs.update(action="append", metavar="KEY",
                          help=f"{field.description}; repeat for several [env {env}]")
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        elif annotation in (int, float):
            kwargs["type"] = annotation
        parser.add_argument(flag, **kwargs)
    return parser


def _show_default(name: str, field: FieldInfo) -> str:
    if name == "decode_workers":
        return "min(4, CPUs)"
    value = field.get_default(call_default_factory=True)
    return "none" if value is None or value == [] else str(value)


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Flags override environment variables; the whole set is validated together."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        parser.error(f"invalid settings: {problems}")
        raise  # unreachable: parser.error exits


def _describe(error: dict) -> str:
    where = ".".join(map(str, error["loc"])) or "settings"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def main(argv: Sequence[str] | None = None, worker_entry: WorkerEntry | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status.

    `worker_entry` (benchmarks): a module-level function each worker process calls before
    it builds its app, the single process included.
    """
    settings = parse_settings(argv)
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    reexec_with_fast_allocator(settings.allocator,
                               sys.argv[1:] if argv is None else list(argv), os.environ)
    workers = workers_for(settings.workers, on_cuda=_models_on_cuda(settings))
    if workers > 1:
        from app.supervisor import supervise

        return supervise(settings, workers, worker_entry)
    if worker_entry is not None:
        worker_entry()
    return serve(settings)


def _models_on_cuda(settings: Settings) -> bool:
    """Whether the models will run on CUDA (without starting CUDA in this process)."""
    if settings.workers or backend_device(settings.backend, settings.device) == "cpu":
        return False
    if settings.device == "cuda":
        return True
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
