"""Reading uploads from a request (multipart or raw image body) within the limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from app.api.multipart import disposition_with_filename, parse_form
from app.config import Settings
from app.exceptions import (
    ClientDisconnectedError,
    InvalidRequestError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from app.serving.imaging import Upload
from models.image_formats import MEDIA_TYPES

T = TypeVar("T")

FILE_FIELD = "file"
RAW_FILENAME = "body"

# the request body of the upload routes (/predict, /explain) as OpenAPI describes it
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"one or more images in the multipart field `{FILE_FIELD}` "
                       "(repeat it for several), or one image as the raw body",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": [FILE_FIELD],
                "properties": {FILE_FIELD: {
                    "type": "array", "items": {"type": "string", "format": "binary"}}},
            }},
            **{media: {"schema": {"type": "string", "format": "binary"}}
               for media in MEDIA_TYPES},
        },
    },
}


async def read_uploads(request: Request, settings: Settings) -> list[Upload]:
    """The request's images: every file in field `file`, or the raw image/* body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data" and not media.startswith("image/"):
        raise UnsupportedMediaTypeError(
            f"unsupported content type {media or 'none'!r}: send multipart/form-data with "
            f"files in the field {FILE_FIELD!r}, or a raw body with an image/* content type")
    body = await _read_body(request, settings.max_upload_bytes)
    if media.startswith("image/"):
        return [Upload(RAW_FILENAME, body)]
    return await _parse_multipart(request, body, settings.max_images_per_request)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 past `limit` bytes (from Content-Length before
    reading when given)."""
    return await _read_body(request, limit)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise MalformedRequestError(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise PayloadTooLargeError(f"request body of {size:,} bytes is over the limit "
                                       f"of {limit:,} bytes")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLargeError(f"request body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnectedError("client disconnected during upload") from None
    return b"".join(chunks)


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> list[Upload]:
    try:
        form = await parse_form(request.headers, body, max_files=max_images, max_fields=100)
    except MultiPartException as exc:
        # the parser stops at max_images files, among other limits: count them to say which
        content_type = request.headers.get("content-type", "")
        if count_file_parts(body, content_type, stop_after=max_images + 1) > max_images:
            raise PayloadTooLargeError(f"more than {max_images} images in one request") \
                from None
        raise MalformedRequestError(f"cannot parse the multipart body: {exc.message}") from None
    try:
        items = form.getlist(FILE_FIELD)
        files = [item for item in items if isinstance(item, UploadFile)]
        if len(files) != len(items):
            raise InvalidRequestError(f"the field {FILE_FIELD!r} must hold files, not text")
        if not files:
            others = sorted(set(form.keys()))
            hint = f" (got fields {others})" if others else ""
            raise InvalidRequestError(f"no image files in the multipart field "
                                      f"{FILE_FIELD!r}{hint}")
        return [Upload(f.filename or f"{FILE_FIELD}{i}", await f.read())
                for i, f in enumerate(files)]
    finally:
        await form.close()


class _CountReached(Exception):
    """Stops counting file parts once the count is known to be over the limit."""


def count_file_parts(body: bytes, content_type: str, *, stop_after: int) -> int:
    """Count a multipart body's file parts, stopping at `stop_after` or where it breaks."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        return 0
    count = 0
    name, value = bytearray(), bytearray()
    disposition = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        nonlocal disposition
        if bytes(name).lower() == b"content-disposition":
            disposition = bytes(value)
        name.clear()
        value.clear()

    def on_headers_finished() -> None:
        nonlocal count, disposition
        if b"filename" in parse_options_header(disposition_with_filename(disposition))[1]:
            count += 1
            if count >= stop_after:
                raise _CountReached
        disposition = b""

    with contextlib.suppress(FormParserError, _CountReached):
        parser = MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished})
        parser.write(body)
        parser.finalize()
    return count


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so its queued images are dropped) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnectedError("client disconnected before the answer was ready")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # drop its queued images now, before this request is gone
            await asyncio.wait({task})


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
