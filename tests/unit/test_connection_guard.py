"""The connection guard's arithmetic and the accept-error filter, without a server."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from app.process.connections import (
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
    caplog.set_level(logging.INFO, logger="app.process.connections")
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
    ours = [r for r in caplog.records if r.name == "app.process.connections"]
    assert len(ours) == 1 and "out of file descriptors" in ours[0].getMessage()
    others = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert len(others) == 1 and "something else" in others[0].getMessage()
    assert "Too many open files" not in caplog.text


def test_the_documented_reserve_is_the_one_in_force() -> None:
    from app.config import Settings

    assert f"minus {FD_RESERVE}" in Settings.model_fields["max_connections"].description
    page = Path(__file__).resolve().parents[2] / "docs" / "serving.md"  # the settings table
    assert f"open-file limit (`ulimit -n`) minus {FD_RESERVE}" in page.read_text(encoding="utf-8")


class StalledTransport(asyncio.Transport):
    """A connection whose client takes nothing: every byte written stays buffered, and the
    protocol is paused past the high-water mark it set, as asyncio's transports do."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered = 0
        self.high = 64 * 1024  # asyncio's default
        self.paused = self.closing = self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > self.high and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The client reads everything at last."""
        self.buffered, self.paused = 0, False
        self.protocol.resume_writing()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
async def test_an_unread_answer_holds_pipelined_requests_back_until_the_write_deadline(
        parser: str) -> None:
    import uvicorn
    from uvicorn.server import ServerState

    from app.process.connections import protocol_for

    answered: list[str] = []

    async def app(scope, receive, send) -> None:
        answered.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 1000})

    events: list[str] = []
    guard = ConnectionGuard(ConnectionLimits(4, 5.0, 10.0, 30.0, write_timeout=0.3),
                            on_event=events.append)
    config = uvicorn.Config(app, log_config=None, lifespan="off", proxy_headers=False)
    protocol = protocol_for(guard, parser)(config=config, server_state=ServerState(),
                                           app_state={})
    transport = StalledTransport(protocol)
    protocol.connection_made(transport)
    protocol.data_received(b"".join(f"GET /{n} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
                                    for n in range(3)))
    for _ in range(20):
        await asyncio.sleep(0)
    # the first answer waits for the client to take it: the second request is not started
    assert answered == ["/0"] and not transport.reading
    for _ in range(2):  # the client takes the head, then the body of the first answer
        transport.drain()
        for _ in range(20):
            await asyncio.sleep(0)
    assert answered == ["/0", "/1"]
    await asyncio.sleep(0.5)  # the second answer is never taken: the connection is cut
    assert transport.aborted and events == ["write_timeout"]
    assert answered == ["/0", "/1"] and guard.served == 0
