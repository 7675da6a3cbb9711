"""GET /openapi.json and GET /docs, behind the same API key as the routes they describe."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.api.auth import API_KEY_REQUIRED

router = APIRouter(include_in_schema=False, dependencies=[API_KEY_REQUIRED])


@router.get("/openapi.json")
async def openapi_schema(request: Request) -> JSONResponse:
    """The app's OpenAPI description."""
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over /openapi.json."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")
