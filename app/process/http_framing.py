"""Request framing that a proxy in front could read differently is refused, not guessed.

h11 frames a request that carries both Content-Length and Transfer-Encoding by the latter, and
takes a bare LF as the end of a head line. A proxy that frames the same bytes by
Content-Length, or that does not end a line at a bare LF, sees a different request boundary,
and the bytes in between reach this server as a request the proxy never saw (request
smuggling). `StrictFraming` refuses both: the server answers 400 and closes the connection,
as RFC 9112 section 6.1 asks after a request with both headers.
"""

from __future__ import annotations

import re

import h11

_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head (a bare LF included)


class StrictFraming(h11.Connection):
    """h11's server connection, refusing ambiguous framing with `h11.RemoteProtocolError`.

    `refusal` says why the last request was refused (None when h11 itself refused it).
    """

    refusal: str | None = None

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """h11's next event, after checking the head it is about to parse."""
        if self.their_state is h11.IDLE:
            self._check_line_endings()
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                self._refuse("the request has both Content-Length and Transfer-Encoding; "
                             "send one of them")
        return event

    def _check_line_endings(self) -> None:
        buffered, _closed = self.trailing_data
        if b"\n" not in buffered:
            return
        end = _HEAD_END.search(buffered)
        head = buffered[:end.end()] if end else buffered
        if head.count(b"\n") != head.count(b"\r\n"):
            self._refuse("a line of the request head ends in a bare LF; end every line "
                         "with CR LF")

    def _refuse(self, reason: str) -> None:
        self.refusal = reason
        raise h11.RemoteProtocolError(reason, error_status_hint=400)
