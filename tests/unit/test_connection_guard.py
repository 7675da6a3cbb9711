"""The connection guard's arithmetic and the accept-error filter, without a server."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from app.connections import (
    FD_RESERVE,
    REFUSAL_SLOTS,
    ConnectionGuard,
    ConnectionLimits,
    connection_cap,
    install_accept_error_filter,
)


def test_the_cap_stays_below_the_open_file_limit() -> None:
    assert connection_cap(1000, 400) == 400 - FD_RESERVE
    assert connection_cap(100, 100_000) == 100
    assert connection_cap(1000, None) == 1000
    assert connection_cap(1000, 10) == 1


def test_guard_serves_then_refuses_then_drops_and_logs_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.connections")
    events: list[str] = []
    guard = ConnectionGuard(ConnectionLimits(3, 5.0, 10.0, 30.0), on_event=events.append)
    admissions = [guard.admit() for _ in range(3 + REFUSAL_SLOTS + 5)]
    assert admissions == ["serve"] * 3 + ["refuse"] * REFUSAL_SLOTS + ["drop"] * 5
    assert events.count("refused") == REFUSAL_SLOTS and events.count("dropped") == 5
    over = [r for r in caplog.records if "connection limit reached" in r.getMessage()]
    assert len(over) == 1 and over[0].levelno == logging.WARNING
    guard.release("serve")
    guard.release("refuse")
    assert guard.admit() == "serve" and guard.admit() == "refuse"
    assert guard.served == 3


def test_accept_failures_for_want_of_descriptors_are_reported_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()
    try:
        install_accept_error_filter(loop)
        for _ in range(5000):  # what asyncio does at the open-file limit, per accept()
            loop.call_exception_handler({
                "message": "socket.accept() out of system resource",
                "exception": OSError(errno.EMFILE, "Too many open files")})
        loop.call_exception_handler({"message": "something else",
                                     "exception": RuntimeError("other")})
    finally:
        loop.close()
    ours = [r for r in caplog.records if r.name == "app.connections"]
    assert len(ours) == 1 and "out of file descriptors" in ours[0].getMessage()
    others = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert len(others) == 1 and "something else" in others[0].getMessage()
    assert "Too many open files" not in caplog.text


def test_the_documented_reserve_is_the_one_in_force() -> None:
    from app.config import Settings

    assert f"minus {FD_RESERVE}" in Settings.model_fields["max_connections"].description
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"open-file limit (`ulimit -n`) minus {FD_RESERVE}" in readme
