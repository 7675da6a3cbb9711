"""GET /docs (Swagger UI, every file served by this app) and GET /openapi.json (needs a key).

The docs page, its script and Swagger UI's own files are open to all and hold nothing
secret: a browser cannot send a header with the page's own URL. The API description behind
them needs the key like every route it describes; the page asks for the key and sends it
with the description and with every call tried from it. Swagger UI's script and style come
from the fastapi-offline package, so the page works where no CDN can be reached.
"""

from __future__ import annotations

import functools
from pathlib import Path as FilePath

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.auth import API_KEY_REQUIRED
from app.api.routes.page import PAGE_DIR

router = APIRouter(include_in_schema=False)

SWAGGER_DIR = FilePath(fastapi_offline.__file__).resolve().parent / "static"
SCRIPT, STYLE = "text/javascript; charset=utf-8", "text/css; charset=utf-8"
# name: (file, type, caching); Swagger UI's files change only with the package
FILES: dict[str, tuple[FilePath, str, str]] = {
    "docs.js": (PAGE_DIR / "docs.js", SCRIPT, "no-cache"),
    "swagger-ui-bundle.js": (SWAGGER_DIR / "swagger-ui-bundle.js", SCRIPT, "max-age=3600"),
    "swagger-ui.css": (SWAGGER_DIR / "swagger-ui.css", STYLE, "max-age=3600"),
}
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _read(path: FilePath) -> bytes:
    return path.read_bytes()


@router.get("/openapi.json", dependencies=[API_KEY_REQUIRED])
async def openapi_schema(request: Request) -> JSONResponse:
    """The app's OpenAPI description (needs the key, like the routes it describes)."""
    return JSONResponse(request.app.openapi())


@router.get("/docs")
@router.head("/docs")
async def swagger_ui() -> Response:
    """Swagger UI's page: it asks for the key, then loads /openapi.json with it."""
    return Response(_read(PAGE_DIR / "docs.html"), media_type="text/html; charset=utf-8",
                    headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


def _file_route(name: str) -> None:
    path, media_type, caching = FILES[name]

    async def serve() -> Response:
        return Response(_read(path), media_type=media_type,
                        headers={**SECURITY_HEADERS, "Cache-Control": caching})

    serve.__doc__ = f"The docs page's {name}."
    router.add_api_route(f"/docs/{name}", serve, methods=["GET", "HEAD"],
                         name=f"docs-{name}")


for _name in FILES:
    _file_route(_name)
