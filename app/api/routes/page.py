"""GET /: the page to try a model, and its script and style (GET /page/{file}).

Plain files shipped in app/page/, served as they are (no build step, nothing from another
host), each with a Content-Security-Policy that allows only this origin: the script is a
file of its own, so no inline script needs to run. The page needs no API key; the API calls
it makes send the key the user gives it.
"""

from __future__ import annotations

import functools
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from app.exceptions import UnknownFileError

router = APIRouter(include_in_schema=False)

PAGE_DIR = FilePath(__file__).resolve().parents[2] / "page"
INDEX = "index.html"
ASSETS: dict[str, str] = {
    INDEX: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _asset(name: str) -> bytes:
    return (PAGE_DIR / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/")
@router.head("/")
async def index() -> Response:
    """The page (GET or HEAD, as uptime checks probe)."""
    return _serve(INDEX)


@router.get("/page/{file}")
@router.head("/page/{file}")
async def asset(file: Annotated[str, Path(max_length=64)]) -> Response:
    """The page's script or style sheet (404 for any other name)."""
    if file not in ASSETS or file == INDEX:
        raise UnknownFileError(f"no page file {file[:64]!r}")
    return _serve(file)
