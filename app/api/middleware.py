"""ASGI middlewares, one job each: request ids, nosniff, request metrics, the last-resort
error answer.

Who may call a route is not decided here: routers declare it (`app.api.auth`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import errors
from app.exceptions import ShuttingDownError
from app.logs import request_id_var
from app.metrics import Metrics

logger = logging.getLogger(__name__)

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Keeps a sane incoming `X-Request-ID` or makes one; logs and the response carry it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                         if k.lower() == b"x-request-id"), "")
        request_id = incoming if _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = [(k, v) for k, v in message.get("headers", [])
                       if k.lower() != b"x-request-id"]
                raw.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": raw}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class NoSniffMiddleware:
    """Every answer says `X-Content-Type-Options: nosniff`, so a browser takes a JSON answer
    (which may repeat what a request sent) for JSON, never for a page or a script."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_nosniff)


class RequestMetricsMiddleware:
    """Counts every answered request by route template, method and status, with its latency."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, send_recording)
        finally:
            self.metrics.observe_request(getattr(scope.get("route"), "path", None),
                                         scope.get("method", ""), status,
                                         time.perf_counter() - began)


class ErrorBoundaryMiddleware:
    """Whatever escapes the app is answered in the service's JSON shape, never a traceback.

    `stopping()` tells whether the service is shutting down: a request cancelled then (the
    server's shutdown timeout ran out) is answered 503 and ends quietly; any other
    cancellation is passed on, as cancellations must be.
    """

    def __init__(self, app: ASGIApp, *, stopping: Callable[[], bool]) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except asyncio.CancelledError:
            if not self.stopping():
                raise
            # the server stops waiting for this request (its shutdown timeout ran out): answer
            # in the service's own shape instead of letting the server log a traceback and
            # send a bare text 500; the task ends here either way
            logger.warning("%s %s cut short: the server is stopping", _method(scope),
                           scope["path"][:200])
            if not started:
                await errors.response_for(ShuttingDownError(
                    "the server stopped before this request finished; retry"),
                    oip=errors.is_oip_path(scope["path"]))(scope, receive, send)
        except Exception:
            logger.exception("unhandled error in %s %s", _method(scope), scope["path"][:200])
            if not started:
                await errors.internal_error_response(oip=errors.is_oip_path(scope["path"]))(
                    scope, receive, send)


def _method(scope: Scope) -> str:
    """The request method for a log line, cut short (a method can be any token)."""
    return str(scope.get("method", ""))[:20]
