"""Reading uploads from a request (multipart or raw image body) within the limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from app.api.multipart import parse_parts
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
MAX_FIELDS = 100  # text fields an upload form may carry beside its files

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
    parts = parse_parts(body, request.headers.get("content-type", ""), max_files=max_images,
                        max_fields=MAX_FIELDS)
    items = [part for part in parts if part.name == FILE_FIELD]
    files = [part for part in items if part.filename is not None]
    if len(files) != len(items):
        raise InvalidRequestError(f"the field {FILE_FIELD!r} must hold files, not text")
    if not files:
        others = sorted({part.name for part in parts})
        hint = f" (got fields {others})" if others else ""
        raise InvalidRequestError(f"no image files in the multipart field {FILE_FIELD!r}{hint}")
    return [Upload(part.filename or f"{FILE_FIELD}{i}", part.data)
            for i, part in enumerate(files)]


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
