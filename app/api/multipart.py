"""Multipart uploads: a body already read within its limits, split into its parts.

`parse_parts` reads the form of an upload route (`/predict`, `/explain`) straight from the
bytes: it finds each boundary with one search over the body, reads each part's headers and
hands each file over as one slice, with the same limits and the same names as Starlette's
form parser (python-multipart), which `/feedback` still uses through `parse_form`: a file
is a part whose Content-Disposition has a file name, every part needs a name, too many files
is 413, and too many text fields, a text field over 1 MiB or a broken body is 400.

A browser or client that sends a name outside ASCII may give it as
`filename*=UTF-8''na%C3%AFve.jpg`. python-multipart skips such parameters (RFC 7578 forbids
them in forms), so the part would read as a text field and the upload be refused. Here the
encoded name is decoded into a plain `filename`, which it overrides as RFC 6266 asks.
"""

from __future__ import annotations

import codecs
import email.message
import email.utils
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartParser

from app.exceptions import MalformedRequestError, PayloadTooLargeError

MAX_FIELD_BYTES = 1024 * 1024  # a text field's most bytes (Starlette's bound too)
_CRLF = b"\r\n"


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


@dataclass(frozen=True)
class FormPart:
    """One part of a multipart body: its field name, its file name (None for a text field)
    and its bytes."""

    name: str
    filename: str | None
    data: bytes


def parse_parts(body: bytes, content_type: str, *, max_files: int,
                max_fields: int) -> list[FormPart]:
    """Every part of the multipart `body`, in order: PayloadTooLargeError past `max_files`
    files, MalformedRequestError past `max_fields` text fields or for a body that does not
    parse."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise _malformed("the Content-Type header names no boundary")
    charset = _charset(params.get(b"charset"))
    delimiter = b"--" + boundary
    separator = _CRLF + delimiter
    pos = 0
    while pos < len(body) and body[pos] in b"\r\n":  # line breaks before the first boundary
        pos += 1
    if not body.startswith(delimiter, pos):
        raise _malformed("the body does not start with its boundary")
    pos += len(delimiter)
    parts: list[FormPart] = []
    files = fields = 0
    while not body.startswith(b"--", pos):  # the closing boundary; what follows is ignored
        if not body.startswith(_CRLF, pos):
            raise _malformed("a boundary is followed by neither a line break nor '--'")
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0 or body.find(separator, pos, head_end) >= 0:
            raise _malformed("a part's headers do not end")
        data_end = body.find(separator, head_end + 4)
        if data_end < 0:
            raise _malformed("the body ends before its closing boundary")
        name, filename = _disposition(body[pos + 2:head_end], charset)
        if filename is not None:
            files += 1
            if files > max_files:
                raise PayloadTooLargeError(f"more than {max_files} images in one request")
        else:
            fields += 1
            if fields > max_fields:
                raise _malformed(f"more than {max_fields} text fields")
            if data_end - head_end - 4 > MAX_FIELD_BYTES:
                raise _malformed(f"the text field {name!r} is over {MAX_FIELD_BYTES:,} bytes")
        parts.append(FormPart(name, filename, body[head_end + 4:data_end]))
        pos = data_end + len(separator)
    return parts


def _disposition(head: bytes, charset: str) -> tuple[str, str | None]:
    """The field name and file name (None: a text field) from a part's header lines."""
    disposition = b""
    for line in head.split(_CRLF) if head else ():
        key, colon, value = line.partition(b":")
        if not colon:
            raise _malformed("a part's header line has no ':'")
        if key.strip().lower() == b"content-disposition":
            disposition = value.strip()
    _, options = parse_options_header(disposition_with_filename(disposition, charset))
    if b"name" not in options:
        raise _malformed('a part\'s Content-Disposition header gives no "name"')
    filename = options.get(b"filename")
    return (_decoded(options[b"name"], charset),
            None if filename is None else _decoded(filename, charset))


def _charset(value: bytes | str | None) -> str:
    """The body's charset (Content-Type's `charset`, default UTF-8; latin-1 when unknown)."""
    name = value.decode("latin-1") if isinstance(value, bytes) else value or "utf-8"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "latin-1"


def _decoded(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _malformed(reason: str) -> MalformedRequestError:
    return MalformedRequestError(f"cannot parse the multipart body: {reason}")
