"""One server process: the app under uvicorn, with our connection limits and signal handling.

`serve` runs the whole service in this process (`--workers 1`); `serve_worker` is what each
process started by app.process.supervisor runs, on the port the supervisor reserved.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from app.config import Settings
from app.logs import configure_logging
from app.process.allocator import loaded_allocator
from app.process.connections import (
    ACCEPT_BATCH,
    ConnectionGuard,
    ConnectionLimits,
    connection_cap,
    install_accept_error_filter,
    open_file_limit,
    protocol_for,
    widen_listen_backlog,
)
from app.process.shared_tables import ClusterTables
from app.process.worker_link import WorkerLink

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("app")

WorkerEntry = Callable[[], None]
PR_SET_PDEATHSIG = 1  # prctl(2)
EXIT_CANNOT_LISTEN = 78  # a worker's exit status when it cannot bind the port (not uvicorn's)


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


def connection_limits(settings: Settings, share: int = 1) -> ConnectionLimits:
    """The connection limits from the settings, the cap lowered to fit the open-file limit
    and divided among `share` worker processes."""
    fd_limit = open_file_limit()
    cap = connection_cap(max(1, settings.max_connections // share), fd_limit)
    logger.info("connections: at most %d open (max_connections %d over %d process(es), "
                "open-file limit %s); timeouts: idle %gs, headers %gs, body %gs, write %gs",
                cap, settings.max_connections, share, fd_limit or "unlimited",
                settings.keepalive_timeout, settings.header_timeout, settings.body_timeout,
                settings.write_timeout)
    return ConnectionLimits(max_connections=cap, keepalive_timeout=settings.keepalive_timeout,
                            header_timeout=settings.header_timeout,
                            body_timeout=settings.body_timeout,
                            write_timeout=settings.write_timeout)


def server_config(app: FastAPI, settings: Settings, share: int = 1) -> uvicorn.Config:
    """uvicorn's configuration: our protocol for `settings.http_parser` with its connection
    limits, no websockets, forwarded headers believed only from `forwarded_allow_ips`."""
    metrics = app.state.metrics
    guard = ConnectionGuard(connection_limits(settings, share),
                            on_event=metrics.connection_hook())
    metrics.watch_connections(lambda: guard.served)
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None,
        log_level=settings.log_level, timeout_graceful_shutdown=settings.shutdown_timeout,
        lifespan="on", server_header=False, http=protocol_for(guard, settings.http_parser),
        ws="none", loop="asyncio", backlog=ACCEPT_BATCH,
        # X-Forwarded-For/-Proto only from the proxies the operator names (uvicorn would
        # believe any local peer), so a client cannot pose as another address or scheme
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        timeout_keep_alive=settings.keepalive_timeout)  # type: ignore[arg-type]


def run_uvicorn(app: FastAPI, settings: Settings, *, share: int = 1,
                sockets: list[socket.socket] | None = None) -> bool:
    """Serve `app` until SIGTERM/SIGINT; True if it started (and so stopped as asked)."""
    from app.main import begin_shutdown

    server = _Server(server_config(app, settings, share), lambda: begin_shutdown(app))
    freeze_startup_objects()
    # uvicorn re-raises the stop signal once it has shut down gracefully; handle it as
    # "done" so a requested stop exits with status 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _already_stopped)
    server.run(sockets=sockets)
    return server.started


def freeze_startup_objects() -> None:
    """Take what start-up left alive out of the cyclic garbage collector's sight.

    The modules, classes and functions that torch, FastAPI and pydantic bring are some 400,000
    objects that live as long as the process, and every full collection walked them all:
    about 0.3 s each on a 2-core VM, several a minute under load, a fifth of the event loop's
    CPU per request. Frozen, they are still freed by reference counting; a cycle among them
    alone would stay, and they stay for the process's life anyway. Models load later, so a
    retired one is collected as before."""
    gc.collect()
    gc.freeze()
    logger.debug("%d objects frozen out of the garbage collector", gc.get_freeze_count())


def serve(settings: Settings) -> int:
    """The whole service in this process; returns the exit status."""
    from app.main import create_app  # torch loads after the allocator choice

    logger.info("allocator: %s", loaded_allocator())
    logger.info("settings: %s", settings.public_dict())
    return 0 if run_uvicorn(create_app(settings), settings) else 1


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, so that several processes can
    listen on the port and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock  # not inherited by child processes (Python's default for sockets)


def listening_socket(host: str, port: int) -> socket.socket:
    """A worker's listening socket on the port it shares with the other workers."""
    sock = shared_port_socket(host, port)
    sock.listen(ACCEPT_BATCH)
    return sock


def _stop_with_supervisor(supervisor: int) -> None:
    """Have the kernel send this process SIGTERM when the supervisor dies (Linux), so a
    killed supervisor never leaves workers serving on the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        logger.debug("PR_SET_PDEATHSIG not available")
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def serve_worker(settings: Settings, tables: ClusterTables, index: int,
                 entry: WorkerEntry | None, supervisor: int) -> None:
    """A worker process's main: one app sharing the port and the tables with the others."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor turns SIGHUP into reloads
    _stop_with_supervisor(supervisor)
    configure_logging(log_format=settings.log_format, level=settings.log_level,
                      worker=index)
    if entry is not None:
        entry()
    from app.main import create_app

    link = WorkerLink(tables, index)
    app = create_app(settings, cluster=link)
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as exc:
        logger.error("worker %d cannot listen on %s:%d: %s", index, settings.host,
                     settings.port, exc)
        sys.exit(EXIT_CANNOT_LISTEN)
    started = run_uvicorn(app, settings, share=tables.workers, sockets=[sock])
    sys.exit(0 if started else 1)
