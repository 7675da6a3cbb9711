"""The one place where errors become HTTP statuses and JSON bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.exceptions import BatchFailedError, ServiceError
from app.logs import request_id_var

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
OIP_PREFIX = "/v2"

def error_response(status: int, detail: str, *, request_id: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error body `{"detail", "request_id"}` carrying the request id header."""
    rid = request_id or request_id_var.get()
    return JSONResponse({"detail": detail, "request_id": rid}, status_code=status,
                        headers={**(headers or {}), REQUEST_ID_HEADER: rid})


def oip_error_response(status: int, detail: str, *,
                       headers: dict[str, str] | None = None) -> JSONResponse:
    """The Open Inference Protocol's error body `{"error"}`, with the request id header."""
    rid = request_id_var.get()
    return JSONResponse({"error": detail}, status_code=status,
                        headers={**(headers or {}), REQUEST_ID_HEADER: rid})


def is_oip_path(path: str) -> bool:
    """True for the Open Inference Protocol's paths (/v2...), whose errors say `error`."""
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def speaks_oip(request: Request) -> bool:
    """True for a request to the Open Inference Protocol's routes."""
    return is_oip_path(request.url.path)


def response_for(exc: Exception, *, oip: bool = False) -> JSONResponse:
    """A known error's answer (in the OIP shape with `oip`), from what its class says
    (app.exceptions); anything else is a bare 500 logged with its traceback."""
    if not isinstance(exc, ServiceError):
        logger.error("request failed: %s", exc, exc_info=exc)
        return internal_error_response(oip=oip)
    detail = str(exc)
    if exc.status == 500:  # a failed batch: logged where it failed, the caller sees an id
        detail = f"internal error while serving the request (request id {request_id_var.get()})"
        logger.log(exc.log_level, "request failed: %s", exc,
                   exc_info=None if isinstance(exc, BatchFailedError) else exc)
    else:
        logger.log(exc.log_level, "%d %s", exc.status, exc)
    if oip:
        return oip_error_response(exc.status, detail, headers=exc.response_headers())
    return error_response(exc.status, detail, headers=exc.response_headers())


def internal_error_response(*, oip: bool = False) -> JSONResponse:
    """The 500 for an unexpected exception (logged by the caller, never shown)."""
    detail = f"internal error while serving the request (request id {request_id_var.get()})"
    return oip_error_response(500, detail) if oip else error_response(500, detail)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
        parts.append(f"{where}: {err.get('msg', 'invalid value')}" if where
                     else str(err.get("msg")))
    return "invalid parameters: " + "; ".join(parts)


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    return response_for(exc, oip=speaks_oip(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = _format_validation(exc)
    oip = speaks_oip(request)  # the protocol answers every bad request 400
    logger.info("%d %s", 400 if oip else 422, detail)
    return oip_error_response(400, detail) if oip else error_response(422, detail)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    logger.info("%d %s", exc.status_code, exc.detail)
    if speaks_oip(request):
        return oip_error_response(exc.status_code, str(exc.detail),
                                  headers=dict(exc.headers or {}))
    return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


def install(app: FastAPI) -> None:
    """Register the error handlers on an app."""
    app.add_exception_handler(ServiceError, _known_error)  # every subclass, by its MRO
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
