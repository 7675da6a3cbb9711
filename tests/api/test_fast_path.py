"""POST /predict's fast path answers every request exactly as FastAPI's route does: the same
statuses, error bodies and answers, with the key the route's router requires."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import APIRouter, Depends, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.fast_path import FastPath, FastPathMiddleware
from app.api.routes import predict
from tests.serving_helpers import fast_settings, jpeg, running_app

KEY = "fast-key"
ON_SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def clients(checkpoint_root: Path) -> AsyncIterator[dict]:
    """Two apps on the same checkpoints: one with the fast path (counting what it answers),
    one where every request goes FastAPI's way."""
    answered: list[int] = []

    async def counted(request: Request):
        response = await predict.predict_fast(request)
        answered.append(0 if response is None else response.status_code)
        return response

    patch = pytest.MonkeyPatch()
    config = fast_settings(checkpoint_root, default_model="colors", api_keys=[KEY])
    async with AsyncExitStack() as stack:
        patch.setattr(predict, "FAST_PATHS",
                      (FastPath(predict.router, "/predict", "POST", counted),))
        fast, _ = await stack.enter_async_context(running_app(config))
        patch.setattr(predict, "FAST_PATHS", ())
        slow, _ = await stack.enter_async_context(running_app(config))
        patch.undo()
        yield {"fast": fast, "slow": slow, "answered": answered}


def _same(a: httpx.Response, b: httpx.Response) -> None:
    """The same status, headers that matter, and body (the request id aside)."""
    assert a.status_code == b.status_code, (a.text, b.text)
    for header in ("content-type", "retry-after", "x-content-type-options"):
        assert a.headers.get(header) == b.headers.get(header), header
    body_a, body_b = a.json(), b.json()
    for body in (body_a, body_b):
        body.pop("request_id", None)
    assert body_a == body_b


async def _both(clients: dict, *, params: str = "", key: str | None = KEY,
                **request: object) -> tuple[httpx.Response, httpx.Response]:
    headers = {"X-API-Key": key} if key else {}
    headers.update(request.pop("headers", {}))  # type: ignore[arg-type]
    return tuple([await clients[which].post(f"/predict{params}", headers=headers, **request)
                  for which in ("fast", "slow")])  # type: ignore[return-value]


FILES = {"file": ("a.jpg", jpeg("red"), "image/jpeg")}


@ON_SESSION_LOOP
@pytest.mark.parametrize("params", [
    "", "?top_k=3", "?top_k=1&top_k=2", "?model=tags", "?model=tags&threshold=0.25",
    "?all_scores=true", "?all_scores=1&reject_unknown=0", "?unknown_param=1",
    # spellings the fast path leaves to FastAPI, good and bad
    "?all_scores=yes", "?all_scores=maybe", "?top_k=05", "?top_k=0", "?top_k=10001",
    "?top_k=abc", "?top_k=", "?threshold=1.5", "?threshold=nan", "?threshold=.5",
    "?model=nope", "?model=" + "x" * 129, "?model=", "?reject_unknown=true",
])
async def test_every_query_is_answered_as_fastapi_answers_it(clients: dict,
                                                             params: str) -> None:
    _same(*await _both(clients, params=params, files=FILES))


@ON_SESSION_LOOP
@pytest.mark.parametrize("request_", [
    {"key": None}, {"key": "wrong"}, {"content": b"x", "headers": {"Content-Type": "text/plain"}},
    {"content": jpeg("blue"), "headers": {"Content-Type": "image/jpeg"}},
    {"content": b"--b\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=b"}},
    {"files": {"image": ("a.jpg", jpeg("red"))}},
    {"files": [("file", (f"{i}.jpg", jpeg("red", seed=i))) for i in range(17)]},
    {"files": {"file": ("bad.jpg", b"\xff\xd8 not a jpeg")}},
], ids=["no-key", "wrong-key", "media-type", "raw-body", "broken", "field", "too-many", "bad"])
async def test_every_bad_request_is_answered_as_fastapi_answers_it(
        clients: dict, request_: dict) -> None:
    request_ = dict(request_)
    key = request_.pop("key", KEY)
    if "files" not in request_ and "content" not in request_:
        request_["files"] = FILES
    _same(*await _both(clients, key=key, **request_))


@ON_SESSION_LOOP
async def test_an_ordinary_request_takes_the_fast_path_and_others_do_not(clients: dict) -> None:
    clients["answered"].clear()
    assert (await clients["fast"].post("/predict", files=FILES,
                                       headers={"X-API-Key": KEY})).status_code == 200
    assert (await clients["fast"].post("/predict?top_k=0", files=FILES,
                                       headers={"X-API-Key": KEY})).status_code == 422
    assert (await clients["fast"].post("/predict", files=FILES)).status_code == 401
    # answered by the fast path, then left to FastAPI; the refused key never reached it
    assert clients["answered"] == [200, 0]
    metrics = (await clients["fast"].get("/metrics", headers={"X-API-Key": KEY})).text
    assert 'route="/predict"' in metrics  # labelled by the route's template as before


values = st.sampled_from(["1", "0", "3", "true", "false", "yes", "0.5", "1.0", "2", "-1",
                          "tags", "colors", "", "%20", "1e-3", "10000", "10001"])
keys = st.sampled_from(["model", "top_k", "threshold", "all_scores", "reject_unknown", "x"])


@ON_SESSION_LOOP
@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(keys, values), max_size=4))
async def test_any_query_is_answered_alike(clients: dict, query: list) -> None:
    params = "?" + "&".join(f"{k}={v}" for k, v in query) if query else ""
    _same(*await _both(clients, params=params, files=FILES))


def test_a_route_whose_dependency_needs_more_than_the_request_keeps_fastapis_way() -> None:
    async def needs_a_setting(request: Request, limit: int = 3) -> None:
        """Not callable with the request alone."""

    router = APIRouter(dependencies=[Depends(needs_a_setting)])

    @router.post("/x")
    async def x() -> dict:
        return {}

    async def handler(request: Request):
        return None

    middleware = FastPathMiddleware(None, paths=[FastPath(router, "/x", "POST", handler)])  # type: ignore[arg-type]
    assert middleware.entries == {}
    kept = FastPathMiddleware(None, paths=[FastPath(predict.router, "/predict", "POST",  # type: ignore[arg-type]
                                                    handler)])
    assert [check.__name__ for check in kept.entries[("POST", "/predict")].checks] == [
        "require_api_key"]
