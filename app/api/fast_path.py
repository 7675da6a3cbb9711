"""Routes answered without FastAPI's routing and dependency resolution, where a request is an
ordinary one: the same route, its checks, errors and answer, a shorter way to them.

A route module may declare `FAST_PATHS` (`FastPath` entries) beside its router: for the
route's method and exact path, `FastPathMiddleware` runs the dependencies the route declares
with its router (each a coroutine of the request alone, as `app.api.auth`'s check is; the app
is built with no dependencies of its own, app.main),
then the entry's handler, which either answers or returns None before reading anything, to
leave the request to FastAPI (a query it does not read at once, a service still starting):
FastAPI then answers it as it always did, 422s and 503s included. Service errors raised on
the way are answered by `app.api.errors`, as FastAPI's handler answers them; the route stays
FastAPI's, so the OpenAPI schema is the same.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import errors
from app.exceptions import ServiceError

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response | None]]
Check = Callable[[Request], Awaitable[None]]


@dataclass(frozen=True)
class FastPath:
    """`router`'s route at `path` for `method`, also answered by `handler` (None: by FastAPI)."""

    router: APIRouter
    path: str
    method: str
    handler: Handler

    def route(self) -> APIRoute:
        """The route of `router` this entry answers for (LookupError when there is none)."""
        for route in self.router.routes:
            if (isinstance(route, APIRoute) and route.path == self.path
                    and self.method in route.methods):
                return route
        raise LookupError(f"no route {self.method} {self.path} in its router")

    def checks(self) -> list[Check] | None:
        """The dependencies the route declares (its router's first, which FastAPI copies into
        the route), in FastAPI's order, when each takes the request alone; None when one does
        not (then FastAPI must run them)."""
        checks = [depends.dependency for depends in self.route().dependencies]
        if all(_takes_the_request_alone(check) for check in checks):
            return checks  # type: ignore[return-value]
        return None


@dataclass(frozen=True)
class _Entry:
    route: APIRoute
    checks: list[Check]
    handler: Handler


class FastPathMiddleware:
    """Answers the requests of the `FastPath` entries, handing the rest to the app."""

    def __init__(self, app: ASGIApp, *, paths: Iterable[FastPath]) -> None:
        self.app = app
        self.entries: dict[tuple[str, str], _Entry] = {}
        for path in paths:
            checks = path.checks()
            if checks is None:
                logger.warning("%s %s keeps FastAPI's way: a dependency of it needs more "
                               "than the request", path.method, path.path)
                continue
            self.entries[(path.method, path.path)] = _Entry(path.route(), checks, path.handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI scope."""
        entry = (self.entries.get((scope.get("method", ""), scope["path"]))
                 if scope["type"] == "http" and not scope.get("root_path") else None)
        if entry is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = entry.route  # what the request metrics are labelled by
        request = Request(scope, receive)
        try:
            for check in entry.checks:
                await check(request)
            response = await entry.handler(request)
        except ServiceError as exc:
            response = errors.response_for(exc, oip=errors.is_oip_path(scope["path"]))
        if response is None:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _takes_the_request_alone(check: Callable[..., object]) -> bool:
    """Whether `check` is a coroutine function of one parameter, the request."""
    if not inspect.iscoroutinefunction(check):
        return False
    parameters = list(inspect.signature(check).parameters.values())
    return len(parameters) == 1 and parameters[0].annotation in (Request, "Request")
