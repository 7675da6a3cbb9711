"""`python -m app`: parse flags (over RESNET_SERVE_* variables), configure logging, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app.config import ENV_PREFIX, Settings
from app.logs import configure_logging
from app.process.allocator import reexec_with_fast_allocator
from app.process.server import WorkerEntry, serve
from app.process.sizing import workers_for
from models.backend_specs import backend_device
from models.flags import REQUIRED, Declaration, FlagSpec, add_flags

logger = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, by the conventions `python -m training` follows too
    (models.flags); unset flags fall back to the environment, then the defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve image-classification checkpoints over HTTP with dynamic batching. "
                    f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>.")
    add_flags(parser, [_declaration(name, field) for name, field in Settings.model_fields.items()],
              env_prefix=ENV_PREFIX)
    return parser


def _declaration(name: str, field: FieldInfo) -> Declaration:
    """A Settings field as models.flags reads it; a FlagSpec among its Annotated metadata
    says what the conventions do not (the api_keys flag is --api-key, given once per key)."""
    spec = next((m for m in field.metadata if isinstance(m, FlagSpec)), FlagSpec())
    computed = field.default_factory is not None
    default = REQUIRED if field.is_required() else None if computed else field.default
    return Declaration(name, field.annotation, field.description or "", default=default,
                       computed=computed, spec=spec)


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
        from app.process.supervisor import supervise

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
