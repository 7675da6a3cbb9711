"""An endpoint is one module of app/api/routes: a module added there is served with no other
edit, and every route the app has comes from such a module."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

import app.api.routes as routes_package
from app.api.routes import all_routers
from app.main import create_app
from tests.serving_helpers import fast_settings

NEW_ROUTE = '''"""GET /hello: an endpoint that exists only in this test."""

from fastapi import APIRouter

from app.api.auth import API_KEY_REQUIRED

router = APIRouter(dependencies=[API_KEY_REQUIRED])


@router.get("/hello")
async def hello() -> dict[str, str]:
    """A greeting."""
    return {"hello": "world"}
'''


def _routes(routes: list) -> list:
    """Every route with methods, looking inside included routers."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found += _routes(inner.routes) if inner is not None else [route]
    return found


@pytest.fixture
def extra_route_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module `hello` beside the real route modules (a second folder of the package)."""
    folder = tmp_path / "more_routes"
    folder.mkdir()
    (folder / "hello.py").write_text(NEW_ROUTE)
    monkeypatch.setattr(routes_package, "__path__", [*routes_package.__path__, str(folder)])
    yield f"{routes_package.__name__}.hello"
    sys.modules.pop(f"{routes_package.__name__}.hello", None)


async def test_an_endpoint_module_added_to_the_routes_package_is_served(
        extra_route_module: str, tmp_path: Path) -> None:
    app = create_app(fast_settings(tmp_path, api_keys=["k1"]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        assert (await http.get("/hello")).status_code == 401  # its router's requirement holds
        answer = await http.get("/hello", headers={"X-API-Key": "k1"})
    assert answer.status_code == 200 and answer.json() == {"hello": "world"}
    assert any(r.endpoint.__module__ == extra_route_module for r in _routes(app.routes)
               if isinstance(r, APIRoute))


def test_every_route_of_the_app_comes_from_a_routes_module(tmp_path: Path) -> None:
    app = create_app(fast_settings(tmp_path))
    included = [getattr(route, "original_router", route) for route in app.routes]
    assert [id(router) for router in included] == [id(router) for router in all_routers()]
    routes = _routes(app.routes)
    assert len(routes) > 20
    for route in routes:
        module = route.endpoint.__module__
        assert module.startswith(f"{routes_package.__name__}."), (route.path, module)
