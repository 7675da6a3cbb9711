"""Both HTTP parsers' protocols keep the same guarantees: ambiguous framing and overlong heads
refused with the same JSON 400, a request after good ones refused only once they are answered,
a trickled head cut off at its deadline; driven byte for byte, without a server."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn
from uvicorn.server import ServerState

from app.process.connections import ConnectionGuard, ConnectionLimits, protocol_for

PARSERS = ["httptools", "h11"]


class Transport(asyncio.Transport):
    """A client connection that takes every byte at once and records them."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = b""
        self.closing = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.sent += data

    def write_eof(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default)


async def connected(parser: str, *, header_timeout: float = 10.0
                    ) -> tuple[asyncio.Protocol, Transport, list[str]]:
    """A protocol of `parser` serving an app that answers its path, and its transport."""
    served: list[str] = []

    async def app(scope, receive, send) -> None:
        served.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    guard = ConnectionGuard(ConnectionLimits(4, 5.0, header_timeout, 30.0))
    config = uvicorn.Config(app, log_config=None, lifespan="off", proxy_headers=False)
    protocol = protocol_for(guard, parser)(config=config, server_state=ServerState(),
                                           app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport, served


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


def refusal(sent: bytes) -> str:
    """The detail of the JSON 400 that ends what was sent."""
    head, _, body = sent.rpartition(b"HTTP/1.1 400 ")[2].partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), sent
    return json.loads(body)["detail"]


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(("request_bytes", "reason"), [
    (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", "both Content-Length and Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n", "both Content-Length and Transfer-Encoding"),
    (b"GET / HTTP/1.1\nHost: t\n\n", "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\nX-B: c\r\n\r\n", "bare LF"),
])
async def test_ambiguous_framing_is_refused_in_the_same_words(
        parser: str, request_bytes: bytes, reason: str) -> None:
    protocol, transport, served = await connected(parser)
    protocol.data_received(request_bytes + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    assert reason in refusal(transport.sent) and transport.closing
    assert served == [] and transport.sent.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("parser", PARSERS)
async def test_a_bad_request_after_good_ones_is_refused_once_they_are_answered(
        parser: str) -> None:
    protocol, transport, served = await connected(parser)
    protocol.data_received(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n"
                           b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n"
                           b"GET /bad HTTP/1.1\nHost: t\n\n")
    for _ in range(5):
        await settle()
    assert served == ["/one", "/two"]
    answers = transport.sent.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"400"], transport.sent
    assert "bare LF" in refusal(transport.sent) and transport.closing


@pytest.mark.parametrize("parser", PARSERS)
async def test_a_head_past_16_kib_is_refused(parser: str) -> None:
    protocol, transport, served = await connected(parser)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n")
    for _ in range(20):  # a head that never ends, a kilobyte at a time
        if transport.closing:
            break
        protocol.data_received(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    await settle()
    assert transport.closing and served == []
    assert refusal(transport.sent)


@pytest.mark.parametrize("parser", PARSERS)
async def test_a_trickled_head_is_cut_off_at_its_deadline(parser: str) -> None:
    protocol, transport, served = await connected(parser, header_timeout=0.2)
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")
    await asyncio.sleep(0.1)
    protocol.data_received(b"st: t\r\n")  # still coming, but the deadline is the head's
    await asyncio.sleep(0.3)
    assert transport.sent.startswith(b"HTTP/1.1 408 ") and transport.closing
    assert served == []


@pytest.mark.parametrize("parser", PARSERS)
async def test_an_ordinary_request_with_a_body_is_served(parser: str) -> None:
    protocol, transport, served = await connected(parser)
    protocol.data_received(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
    protocol.data_received(b"cd")
    await settle()
    assert served == ["/up"] and transport.sent.startswith(b"HTTP/1.1 200 ")
    assert b"\r\n/up\r\n" in transport.sent and not transport.closing  # chunked
