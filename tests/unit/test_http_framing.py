"""Request framing a proxy could read differently is refused by the server's h11 connection."""

from __future__ import annotations

import h11
import pytest

from app.process.http_framing import StrictFraming


def _events(data: bytes) -> list[object]:
    conn = StrictFraming(h11.SERVER)
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\ncontent-length: 0\r\n\r\n",
])
def test_content_length_with_transfer_encoding_is_refused(head: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError, match="both Content-Length and Transfer"):
        _events(head + b"0\r\n\r\n")


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\nHost: t\n\n",
    b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\n\n",
    b"GET / HTTP/1.1\nHost: t",  # refused before the head is even complete
])
def test_a_bare_lf_in_the_head_is_refused(head: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError, match="bare LF"):
        _events(head)


def test_crlf_heads_and_bodies_with_bare_lf_pass() -> None:
    body = b"a\nb\n\nc"
    events = _events(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\n" + body)
    assert isinstance(events[0], h11.Request)
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == body
    chunked = _events(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\na\nb\r\n0\r\n\r\n")
    assert b"".join(e.data for e in chunked if isinstance(e, h11.Data)) == b"a\nb"


def test_a_pipelined_head_is_checked_when_its_turn_comes() -> None:
    conn = StrictFraming(h11.SERVER)
    conn.receive_data(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\nHost: t\n\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    with pytest.raises(h11.RemoteProtocolError, match="bare LF"):
        conn.next_event()
