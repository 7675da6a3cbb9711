"""`python -m app`: parse flags (over RESNET_SERVE_* variables), configure logging, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Literal, get_args, get_origin

import uvicorn
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app.allocator import loaded_allocator, reexec_with_fast_allocator
from app.config import ENV_PREFIX, Settings
from app.connections import (
    ACCEPT_BATCH,
    ConnectionGuard,
    ConnectionLimits,
    connection_cap,
    install_accept_error_filter,
    open_file_limit,
    protocol_for,
    widen_listen_backlog,
)
from app.logs import configure_logging

if TYPE_CHECKING:
    from fastapi import FastAPI

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


class _Server(uvicorn.Server):
    """uvicorn's server, turning not-ready the moment SIGTERM/SIGINT arrives."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening, with accept() failures reported once a minute, not per try."""
        install_accept_error_filter(asyncio.get_running_loop())
        await super().startup(sockets=sockets)
        if self.started:
            widen_listen_backlog([sock for server in self.servers for sock in server.sockets])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Refuse new work at once, then let uvicorn finish the requests in flight."""
        self._on_exit_signal()
        super().handle_exit(sig, frame)


def _already_stopped(sig: int, frame: FrameType | None) -> None:
    logger.debug("signal %d after shutdown", sig)


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The connection limits from the settings, the cap lowered to fit the open-file limit."""
    fd_limit = open_file_limit()
    cap = connection_cap(settings.max_connections, fd_limit)
    logger.info("connections: at most %d open (max_connections %d, open-file limit %s); "
                "timeouts: idle %gs, headers %gs, body %gs", cap, settings.max_connections,
                fd_limit or "unlimited", settings.keepalive_timeout, settings.header_timeout,
                settings.body_timeout)
    return ConnectionLimits(max_connections=cap, keepalive_timeout=settings.keepalive_timeout,
                            header_timeout=settings.header_timeout,
                            body_timeout=settings.body_timeout)


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration: our h11 protocol with its connection limits, no websockets."""
    metrics = app.state.metrics
    guard = ConnectionGuard(connection_limits(settings), on_event=metrics.connection_hook())
    metrics.watch_connections(lambda: guard.served)
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None,
        log_level=settings.log_level, timeout_graceful_shutdown=settings.shutdown_timeout,
        lifespan="on", server_header=False, http=protocol_for(guard), ws="none",
        loop="asyncio", backlog=ACCEPT_BATCH,
        timeout_keep_alive=settings.keepalive_timeout)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    settings = parse_settings(argv)
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    reexec_with_fast_allocator(settings.allocator,
                               sys.argv[1:] if argv is None else list(argv), os.environ)
    from app.main import begin_shutdown, create_app  # torch loads after the allocator choice

    logger.info("allocator: %s", loaded_allocator())
    logger.info("settings: %s", settings.public_dict())
    app = create_app(settings)
    server = _Server(server_config(app, settings), lambda: begin_shutdown(app))
    # uvicorn re-raises the stop signal once it has shut down gracefully; handle it as
    # "done" so a requested stop exits with status 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _already_stopped)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
