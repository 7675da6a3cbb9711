"""Per-request context: request id, API-key check, metrics, and a last-resort 500."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import errors
from app.exceptions import AuthenticationError, ShuttingDownError
from app.logs import request_id_var
from app.metrics import Metrics

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestContextMiddleware:
    """Gives each request an id, checks API keys, records metrics, never leaks a traceback."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, api_keys: list[bytes]) -> None:
        self.app = app
        self.metrics = metrics
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", [])
                       if k.lower() != b"x-request-id"]
                raw.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": raw}
            await send(message)

        began = time.perf_counter()
        try:
            if self.api_keys and scope["path"] not in OPEN_PATHS \
                    and not self._authorized(headers):
                response = errors.response_for(AuthenticationError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' "
                    "or 'X-API-Key: <key>'"))
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # the server stops waiting for this request (its shutdown timeout ran out): answer
            # in the service's own shape instead of letting the server log a traceback and
            # send a bare text 500; the task ends here either way
            logger.warning("%s %s cut short: the server is stopping", _method(scope),
                           scope["path"][:200])
            if not started:
                await errors.response_for(ShuttingDownError(
                    "the server stopped before this request finished; retry"))(
                    scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s", _method(scope), scope["path"][:200])
            if not started:
                await errors.internal_error_response()(scope, receive, send_with_id)
        finally:
            self.metrics.observe_request(getattr(scope.get("route"), "path", None),
                                         scope.get("method", ""), status,
                                         time.perf_counter() - began)
            request_id_var.reset(token)

    def _authorized(self, headers: dict[str, str]) -> bool:
        offered = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if not offered and auth[:7].lower() == "bearer ":
            offered = auth[7:].strip()
        if not offered:
            return False
        candidate = offered.encode("latin-1")  # the bytes as sent (headers decode as latin-1)
        # compare against every key so the time taken does not say which one nearly matched
        matches = [hmac.compare_digest(candidate, key) for key in self.api_keys]
        return any(matches)


def _method(scope: Scope) -> str:
    """The request method for a log line, cut short (a method can be any token)."""
    return str(scope.get("method", ""))[:20]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope.get("headers", [])}
