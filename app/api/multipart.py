"""Multipart uploads whose file name comes as `filename*` (RFC 5987, RFC 6266) are files too.

A browser or client that sends a name outside ASCII may give it as
`filename*=UTF-8''na%C3%AFve.jpg`. python-multipart skips such parameters (RFC 7578 forbids
them in forms), so the part would read as a text field and the upload be refused. Here the
encoded name is decoded into a plain `filename`, which it overrides as RFC 6266 asks.
"""

from __future__ import annotations

import email.message
import email.utils
from collections.abc import AsyncIterator

from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartParser


def disposition_with_filename(disposition: bytes | None, charset: str = "utf-8") -> bytes:
    """`disposition` with its `filename*` decoded into `filename`; as it was without one."""
    if not disposition or b"filename*" not in disposition.lower():
        return disposition or b""
    header = email.message.Message()
    header["content-disposition"] = disposition.decode("latin-1")
    kind, *params = header.get_params(header="content-disposition") or [("", "")]
    encoded = next((value for key, value in params
                    if key.lower() == "filename" and isinstance(value, tuple)), None)
    if encoded is None:  # a malformed `filename*`: left for the parser to judge
        return disposition
    name = email.utils.collapse_rfc2231_value(encoded, errors="replace")
    name = "".join(char if char.isprintable() else "?" for char in name)
    kept = [(key, value) for key, value in params
            if key.lower() != "filename" and isinstance(value, str)]
    return b"; ".join([kind[0].encode("latin-1"),
                       *(key.encode("latin-1") + b"=" + _quoted(value, charset)
                         for key, value in [*kept, ("filename", name)])])


def _quoted(value: str, charset: str) -> bytes:
    raw = value.encode(charset, errors="replace")
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class UploadFormParser(MultiPartParser):
    """Starlette's multipart parser, taking a part's `filename*` as its file name."""

    def on_headers_finished(self) -> None:
        """Decode the part's `filename*`, then let Starlette sort file from field."""
        part = self._current_part
        part.content_disposition = disposition_with_filename(part.content_disposition,
                                                             self._charset or "utf-8")
        super().on_headers_finished()


async def parse_form(headers: Headers, body: bytes, *, max_files: int,
                     max_fields: int) -> FormData:
    """The multipart `body` as form data (raises starlette's MultiPartException)."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    return await UploadFormParser(headers, stream(), max_files=max_files,
                                  max_fields=max_fields).parse()
