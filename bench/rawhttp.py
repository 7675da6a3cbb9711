"""A minimal keep-alive HTTP/1.1 client for load generation.

httpx spends about a millisecond of CPU per request; on a two-core machine that makes the
client, not the server, the thing that saturates. This client sends pre-built request bytes
over pooled connections and reads only the status, the headers and a Content-Length body.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class RawResponse:
    """Status, lower-cased headers and body of one response."""

    status: int
    headers: dict[str, str]
    body: bytes


def build_request(method: str, path: str, host: str, *, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive, explicit Content-Length)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawHttpClient:
    """Pooled keep-alive connections to one loopback server; at most `max_connections`.

    A connection idle for `max_idle` seconds is not reused: the server may be closing it
    (uvicorn's keep-alive timeout is 5 s), and a request sent into that race is lost.
    """

    def __init__(self, host: str, port: int, *, max_connections: int = 256,
                 timeout: float = 60.0, max_idle: float = 3.0) -> None:
        self.host, self.port, self.timeout, self.max_idle = host, port, timeout, max_idle
        self._idle: list[tuple[Connection, float]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def _connection(self) -> Connection:
        while self._idle:
            conn, since = self._idle.pop()
            if time.monotonic() - since < self.max_idle and not conn[0].at_eof():
                return conn
            conn[1].close()
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, request: bytes) -> RawResponse:
        """Send pre-built request bytes; raises OSError/TimeoutError on transport failure."""
        async with self._slots:
            conn = await self._connection()
            try:
                response = await asyncio.wait_for(self._exchange(conn, request), self.timeout)
            except BaseException:
                conn[1].close()
                raise
            if response.headers.get("connection", "").lower() == "close":
                conn[1].close()
            else:
                self._idle.append((conn, time.monotonic()))
            return response

    async def _exchange(self, conn: Connection, request: bytes) -> RawResponse:
        reader, writer = conn
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionResetError("server closed the connection")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return RawResponse(status, headers, body)

    async def close(self) -> None:
        """Close every pooled connection."""
        for (_, writer), _ in self._idle:
            writer.close()
        self._idle.clear()
