"""Auth on every route but /health and /ready, keys never logged; pickles never loaded."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest

import app.api.auth as auth
from tests.serving_helpers import fast_settings, jpeg, running_app, wait_until_ready

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "k3y-Never-Logged-9f2"


def _routes(routes: list) -> list:
    """Every route with methods, looking inside included routers."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            found += _routes(inner.routes)
        elif getattr(route, "methods", None):
            found.append(route)
    return found


async def test_every_route_but_health_and_ready_needs_the_key(
        checkpoint_root: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    compared: list[bytes] = []
    real_compare = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real_compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    settings = fast_settings(checkpoint_root, default_model="colors", api_keys=[KEY, "two"])
    async with running_app(settings, wait_ready=False) as (http, app):
        await wait_until_ready(http)
        # every route the app has, whichever router declared it: a route added without the
        # key requirement fails here
        paths = {(m, r.path) for r in _routes(app.routes) for m in r.methods}
        assert {("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/metrics")} <= paths
        for method, path in sorted(paths):
            concrete = path.replace("{name}", "colors").replace("{file}", "app.js")
            open_ = path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready",
                             "/", "/page/{file}",  # the page asks for the key itself
                             "/docs", "/docs/docs.js", "/docs/swagger-ui-bundle.js",
                             "/docs/swagger-ui.css")  # so does /docs, for /openapi.json
            for headers in ({}, {"X-API-Key": KEY[:-1]}, {"Authorization": f"Bearer {KEY}x"},
                            {"Authorization": f"Basic {KEY}"}, {"X-API-Key": ""}):
                r = await http.request(method, concrete, headers=headers)
                if open_:
                    assert r.status_code in (200, 405), (method, path)
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert KEY not in r.text
        for method, path in (("GET", "/no-such-route"), ("POST", "/models/colors")):
            r = await http.request(method, path)  # no route: nothing to authorise, no data
            assert r.status_code in (404, 405) and set(r.json()) == {"detail", "request_id"}
        for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                        {"authorization": "bearer two"}):
            ok = await http.post("/predict", headers={**headers, "X-Request-ID": "authed"},
                                 files={"file": ("a.jpg", jpeg("red"))})
            assert ok.status_code == 200, headers
        assert (await http.get("/openapi.json", headers={"X-API-Key": KEY})).status_code == 200
    # every configured key is compared on every check, in constant time
    assert compared and set(compared) == {KEY.encode(), b"two"}
    assert KEY not in caplog.text and KEY[:-1] not in caplog.text
    assert "2 configured" in json.dumps(settings.public_dict())


async def test_a_pickle_in_the_checkpoint_folder_is_never_unpickled(
        make_checkpoint_dir, checkpoint_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps(Payload())
    assert not marker.exists()
    card = json.loads((checkpoint_root / "colors" / "card.json").read_text())
    root = make_checkpoint_dir("colors", broken={
        "evil": {"card.json": json.dumps({**card, "name": "evil"}).encode(), "model.pt": evil},
        "posing": {"card.json": json.dumps({**card, "name": "posing"}).encode(),
                   "model.safetensors": evil},
    })
    (root / "colors" / "extra.pkl").write_bytes(evil)
    (root / "stray.pth").write_bytes(evil)
    async with running_app(fast_settings(root, default_model="colors")) as (http, _app):
        assert (await http.post("/models/reload")).status_code == 200
        models = {m["name"]: m for m in (await http.get("/models")).json()["models"]}
        assert models["evil"]["status"] == "failed"
        assert "pickle" in models["evil"]["error"] and "model.pt" in models["evil"]["error"]
        assert models["posing"]["status"] == "failed"
        assert "model.safetensors" in models["posing"]["error"]
        assert models["colors"]["status"] == "loaded"
        r = await http.post("/predict", params={"model": "evil"},
                            files={"file": ("a.jpg", jpeg("red"))})
        assert r.status_code == 404
    assert not marker.exists(), "a pickle was executed"
    pickle.loads(evil)  # the payload is real: unpickling it does create the marker
    assert marker.exists()
