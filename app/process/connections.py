"""Client connections: a deadline on every phase of a request, and a cap on open sockets.

uvicorn's protocols close an idle connection only after they have answered a request on it:
a client that connects and sends nothing, trickles a request head, or trickles a body keeps
its socket for ever, and enough of them exhaust the process's file descriptors.
`GuardedHttpToolsProtocol` (llhttp, uvicorn's C parser; the default) and `GuardedH11Protocol`
(h11, pure Python) give each phase its own deadline (idle: `keepalive_timeout`, request
head: `header_timeout`, request body: `body_timeout`, an answer the client does not take:
`write_timeout`) and refuse the same ambiguous requests in the same words; `ConnectionGuard`
caps the connections served below the open-file limit and answers the ones over it with a
quick 503.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

import h11
import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.process.http_framing import StrictFraming

logger = logging.getLogger(__name__)

# asyncio accepts up to its `backlog` connections per loop iteration before any protocol
# sees them, so the accept batch is kept small (and the kernel's queue large, see
# `widen_listen_backlog`): at most a few batches of sockets exist that the guard has not
# judged yet, and the descriptors they take come out of FD_RESERVE.
ACCEPT_BATCH = 16
LISTEN_BACKLOG = 2048
REFUSAL_SLOTS = 32  # over-limit connections that may wait for their 503 at once
FD_RESERVE = 4 * ACCEPT_BATCH + REFUSAL_SLOTS + 32  # the rest: logs, the listener, model files
REFUSAL_GRACE = 1.0  # seconds a refused connection stays half-open so its 503 is read
REPORT_INTERVAL = 60.0  # seconds between two log lines about the same condition
MAX_HEAD_BYTES = 16 * 1024  # the longest request head (h11's own bound, kept for httptools)

Admission = Literal["serve", "refuse", "drop"]
Phase = Literal["idle", "head", "body", "app"]


@dataclass(frozen=True)
class ConnectionLimits:
    """The cap on served connections and the deadline of each phase of a request."""

    max_connections: int
    keepalive_timeout: float
    header_timeout: float
    body_timeout: float
    write_timeout: float = 30.0


def widen_listen_backlog(listeners: list[Any]) -> None:
    """Let the kernel queue `LISTEN_BACKLOG` connections on sockets opened with a small one."""
    for listener in listeners:
        with socket.fromfd(listener.fileno(), listener.family, listener.type) as same:
            same.listen(LISTEN_BACKLOG)


def open_file_limit() -> int | None:
    """This process's soft limit on open files (None where unlimited or unknown)."""
    try:
        import resource
    except ImportError:  # not a Unix system
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(wanted: int, fd_limit: int | None) -> int:
    """`wanted`, lowered so that client sockets can never use up the open-file limit."""
    if fd_limit is None:
        return wanted
    return max(1, min(wanted, fd_limit - FD_RESERVE))


class RateLimitedReport:
    """Logs a recurring condition at most once per `REPORT_INTERVAL`, counting the rest."""

    def __init__(self, log: Callable[[int], None]) -> None:
        self._log = log
        self._last: float | None = None
        self._unreported = 0

    def note(self) -> None:
        """One more occurrence; logged (with the count since the last line) if due."""
        self._unreported += 1
        now = time.monotonic()
        if self._last is None or now - self._last >= REPORT_INTERVAL:
            self._log(self._unreported)
            self._last, self._unreported = now, 0


class ConnectionGuard:
    """Counts the server's client connections and decides whether a new one is served."""

    def __init__(self, limits: ConnectionLimits,
                 on_event: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.served = 0
        self.awaiting_refusal = 0
        self._on_event = on_event or (lambda event: None)
        self._over_limit = RateLimitedReport(self._log_over_limit)

    def admit(self) -> Admission:
        """Serve a new connection, refuse it (503, kept open a moment) or drop it (503, closed)."""
        if self.served < self.limits.max_connections:
            self.served += 1
            return "serve"
        self._over_limit.note()
        if self.awaiting_refusal < REFUSAL_SLOTS:
            self.awaiting_refusal += 1
            self.event("refused")
            return "refuse"
        self.event("dropped")
        return "drop"

    def release(self, admission: Admission) -> None:
        """A connection admitted as `admission` has closed."""
        if admission == "serve":
            self.served -= 1
        elif admission == "refuse":
            self.awaiting_refusal -= 1

    def event(self, name: str) -> None:
        """Report refused, dropped, header_timeout, body_timeout or write_timeout (metrics)."""
        self._on_event(name)

    def _log_over_limit(self, count: int) -> None:
        logger.warning(
            "connection limit reached: %d connections open (max_connections %d); new ones are "
            "answered 503 until some close (%d refused since the last report)",
            self.served, self.limits.max_connections, count)


class _GuardedProtocol:
    """What both parsers' protocols share: admission, the deadline of each phase, the write
    deadline and the answers (408, 400, 503) in the service's JSON shape. A subclass says
    which phase its parser is in (`_current_phase`) and why it refused a request."""

    guard: ConnectionGuard
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    timeout_keep_alive: float
    timeout_keep_alive_task: asyncio.TimerHandle | None
    client: tuple[str, int] | None

    def _start_guarding(self) -> None:
        self._admission: Admission | None = None
        self._phase: Phase = "idle"
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._answer_waiting = False  # answered, but the answer has not left yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection, refuse it with 503, or close it at once."""
        super().connection_made(transport)  # type: ignore[misc]
        self._admission = self.guard.admit()
        if self._admission == "serve":  # idle until its first byte: the keep-alive timeout
            # any byte the kernel does not take at once is waiting to leave: pause_writing
            # then starts the write deadline, resume_writing comes once all of it has left
            transport.set_write_buffer_limits(high=0)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)  # type: ignore[attr-defined]
            return
        # answered before its request is read: a client reads the 503 after sending
        transport.write(error_bytes(503, "too many open connections; retry shortly",
                                    uuid.uuid4().hex, ("retry-after: 1",)))
        if self._admission == "drop":
            transport.close()
        else:  # half-close and read what the client sends, so closing does not reset
            transport.write_eof()
            self._arm(REFUSAL_GRACE, self._close_quietly)

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the connection's place and its deadlines."""
        self._disarm()
        self._disarm_write()
        if self._admission is not None:
            self.guard.release(self._admission)
            self._admission = None
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        """After an answer has left, the next request (possibly pipelined) starts its phases.

        An answer still waiting for the client to take it holds the next request back:
        a client that pipelines requests and never reads gets no more work done for it,
        and the write deadline closes its connection."""
        if not self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._answer_waiting = True
            self.flow.pause_reading()  # type: ignore[attr-defined]
            return
        super().on_response_complete()  # type: ignore[misc]
        self._follow_request()

    def pause_writing(self) -> None:
        """The client is not taking what is sent: the write deadline starts."""
        super().pause_writing()  # type: ignore[misc]
        if self._admission == "serve" and self._write_deadline is None:
            self._write_deadline = self.loop.call_later(
                self.guard.limits.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        """Everything sent has left; an answer held back lets the next request in."""
        super().resume_writing()  # type: ignore[misc]
        self._disarm_write()
        if self._answer_waiting:
            self._answer_waiting = False
            self.on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """A request the parser refused: the service's JSON 400, then close."""
        self.transport.write(error_bytes(400, self._refusal_reason(), uuid.uuid4().hex))
        self.transport.close()

    def _unsupported_upgrade_warning(self) -> None:
        """The service has no websockets: an Upgrade header is ignored, quietly."""
        logger.debug("ignoring an Upgrade request header from %s", _peer(self.client))

    def _refusal_reason(self) -> str:
        return "the request is not valid HTTP/1.1"

    def _current_phase(self) -> Phase:
        raise NotImplementedError

    def _follow_request(self) -> None:
        if self._admission != "serve":
            return
        if self.transport.is_closing():
            self._disarm()
            return
        phase = self._current_phase()
        if phase == "idle" and self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)  # type: ignore[attr-defined]
        if phase == self._phase:
            return
        self._disarm()
        self._phase = phase
        if phase == "head":
            self._arm(self.guard.limits.header_timeout, self._head_timed_out)
        elif phase == "body":
            self._arm(self.guard.limits.body_timeout, self._body_timed_out)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_write(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _close_quietly(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._current_phase() != "head":
            return
        seconds = self.guard.limits.header_timeout
        self.guard.event("header_timeout")
        logger.debug("closing a connection from %s: no complete request head in %s s",
                     _peer(self.client), seconds)
        self.transport.write(error_bytes(
            408, f"the request head did not arrive within {seconds:g} s", uuid.uuid4().hex))
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._current_phase() != "body":
            return
        cycle, seconds = self.cycle, self.guard.limits.body_timeout  # type: ignore[attr-defined]
        if cycle is not None and not cycle.response_complete:
            if not cycle.response_started:
                request_id = cycle.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
                self.transport.write(error_bytes(
                    408, f"the request body did not arrive within {seconds:g} s", request_id))
            cycle.disconnected = True  # the app's receive() now reports the client gone
            cycle.message_event.set()
        self.guard.event("body_timeout")
        logger.debug("closing a connection from %s: request body not in after %s s",
                     _peer(self.client), seconds)
        self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        if not self.transport.get_write_buffer_size():
            return
        seconds = self.guard.limits.write_timeout
        self.guard.event("write_timeout")
        logger.debug("closing a connection to %s: its answer has not left after %s s",
                     _peer(self.client), seconds)
        self.transport.abort()  # close() would wait for the buffer to drain, which it never does


class GuardedH11Protocol(_GuardedProtocol, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with a deadline on each phase of a request and a
    connection cap; framing a proxy could read differently is refused (`StrictFraming`).

    Use `protocol_for(guard, "h11")` to get a subclass bound to a guard for
    `uvicorn.Config(http=)`.
    """

    conn: StrictFraming

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        event_limit = self.config.h11_max_incomplete_event_size
        self.conn = (StrictFraming(h11.SERVER) if event_limit is None
                     else StrictFraming(h11.SERVER, event_limit))
        self._start_guarding()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, then follow the request into its next phase."""
        if self._admission != "serve":
            return  # a refused connection: its answer has gone, its request is dropped
        super().data_received(data)
        self._follow_request()

    def _refusal_reason(self) -> str:
        return self.conn.refusal or "the request is not valid HTTP/1.1"

    def _current_phase(self) -> Phase:
        state = self.conn.their_state
        if state is h11.IDLE:  # h11 keeps the bytes of a head until it is complete
            return "head" if self.conn.trailing_data[0] else "idle"
        if state is h11.SEND_BODY:
            return "body"
        return "app"  # the request is in; request_timeout bounds the answer


class GuardedHttpToolsProtocol(_GuardedProtocol, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C) with the same deadlines, cap and answers.

    llhttp refuses what `StrictFraming` refuses for h11 (Content-Length with
    Transfer-Encoding, a bare LF or lone CR ending a head line), and its reasons are said in
    the same words. What it does not bound is the head, so a head longer than
    `MAX_HEAD_BYTES` (h11's own bound) is refused here. A request it cannot parse that
    follows others on the connection is refused once their answers have left, as h11 reads
    a pipelined request only when its turn comes.

    Use `protocol_for(guard, "httptools")` to get a subclass bound to a guard.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_guarding()
        self._in_head = False  # a request head has begun and is not complete
        self._in_body = False  # a request's head is in, the end of its body is not
        self._head_bytes = 0
        self._head_limit = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
        self._refusal: str | None = None  # why the parser refused, once it has
        self._refusal_due = False  # refused, the 400 waiting for the answers before it

    def data_received(self, data: bytes) -> None:
        """Feed the parser, bound the head, then follow the request into its next phase."""
        if self._admission != "serve" or self._refusal is not None:
            return  # refused: its answer has gone (or waits), the rest is dropped
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # no websockets: served as a plain request
        except httptools.HttpParserError as exc:
            self._refuse(_llhttp_reason(exc))
            return
        if self._in_head:
            self._head_bytes += len(data)  # at most one read more than the head
            if self._head_bytes > self._head_limit:
                self._refuse(f"the request head is longer than {self._head_limit:,} bytes")
                return
        self._follow_request()

    def on_message_begin(self) -> None:
        """A request head begins."""
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        """The head is in; its body (maybe empty) follows."""
        self._in_head, self._in_body = False, True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The whole request is in."""
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """As for h11; a refusal waiting for the answers before it is sent after the last."""
        super().on_response_complete()
        if self._refusal_due and not self._answer_waiting and not self._busy():
            self._refusal_due = False
            self.send_400_response(self._refusal or "")

    def _refuse(self, reason: str) -> None:
        self._refusal = reason
        logger.debug("refusing a request from %s: %s", _peer(self.client), reason)
        if self._busy():  # answers still owed on this connection: the 400 comes after them
            self._refusal_due = True
            self._disarm()
            self.flow.pause_reading()
        else:
            self.send_400_response(reason)

    def _busy(self) -> bool:
        """Whether a request of this connection is being answered or waits its turn."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _refusal_reason(self) -> str:
        return self._refusal or "the request is not valid HTTP/1.1"

    def _current_phase(self) -> Phase:
        if self.pipeline or self._refusal is not None:
            return "app"  # requests wait their turn: not read, so no deadline of the client's
        if self._in_body:  # answered or not, the body must come in within its deadline
            return "body"
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return "app"
        return "head" if self._in_head else "idle"


PARSERS: dict[str, type[_GuardedProtocol]] = {
    "httptools": GuardedHttpToolsProtocol, "h11": GuardedH11Protocol}


def protocol_for(guard: ConnectionGuard, parser: str = "httptools") -> type[_GuardedProtocol]:
    """The protocol of `parser` ("httptools" or "h11"), bound to `guard`, for
    `uvicorn.Config(http=...)`."""
    base = PARSERS[parser]
    return type(f"Bound{base.__name__}", (base,), {"guard": guard})


def _llhttp_reason(exc: Exception) -> str:
    """What llhttp refused, in the words `StrictFraming` uses for the same (else its own)."""
    message = str(exc)
    if "Content-Length" in message and "Transfer-Encoding" in message:
        return ("the request has both Content-Length and Transfer-Encoding; send one of them")
    if "Expected CRLF" in message or "expected CR" in message or "expected LF" in message:
        return ("a line of the request head ends in a bare LF or a lone CR; end every line "
                "with CR LF")
    return f"the request is not valid HTTP/1.1: {message}"


def error_bytes(status: int, detail: str, request_id: str,
                extra_headers: tuple[str, ...] = ()) -> bytes:
    """A whole HTTP/1.1 error response in the service's JSON shape, closing the connection."""
    body = json.dumps({"detail": detail, "request_id": request_id}, separators=(",", ":")).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "content-type: application/json", "x-content-type-options: nosniff",
            f"content-length: {len(body)}",
            f"x-request-id: {request_id}", "connection: close", *extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def install_accept_error_filter(loop: asyncio.AbstractEventLoop) -> None:
    """Report accept() failures for want of descriptors once a minute instead of per try.

    asyncio logs one traceback per failed accept() and retries a whole backlog of them, so a
    process at its open-file limit writes tens of thousands of tracebacks a second.
    """
    report = RateLimitedReport(lambda count: logger.error(
        "cannot accept connections: the process is out of file descriptors or memory "
        "(%d failed accepts since the last report); lower max_connections or raise the "
        "open-file limit", count))
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES \
                and "accept" in str(context.get("message", "")):
            report.note()
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
