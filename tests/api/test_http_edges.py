"""HTTP edge cases: bounded metrics labels, HEAD probes, long names, file counting, keys,
and the answer to a request the server stops waiting for."""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from starlette.formparsers import MultiPartException

from app.__main__ import parse_settings
from app.config import Settings
from app.main import create_app
from tests.serving_helpers import fast_settings, inside, jpeg, running_app

ON_SESSION_LOOP = pytest.mark.asyncio(loop_scope="session")
SERIES = re.compile(r"^resnet_serve_requests_total\{(.*)\} ", re.M)


def _junk(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=length))


@ON_SESSION_LOOP
async def test_metrics_labels_stay_bounded_whatever_requests_send(checkpoint_root: Path) -> None:
    rng = random.Random(0)
    settings = fast_settings(checkpoint_root, default_model="colors", api_keys=["s3cret"])
    auth = {"X-API-Key": "s3cret"}
    async with running_app(settings, wait_ready=False) as (http, _app):
        sent: list[str] = []
        for _ in range(40):
            method, name, path = _junk(rng, 1000).upper(), _junk(rng, 60), _junk(rng, 200)
            sent += [method, name, path]
            await http.request(method, f"/{path}", headers=auth)
            await http.request(method, f"/models/{name}", headers=auth)
            await http.get(f"/models/{name}", headers=auth)
            await http.post(f"/predict?model={name}", headers=auth,
                            files={"file": ("a.jpg", jpeg("red"))})
            await http.request(method, f"/{path}")  # 401: no key
            await http.get(f"/models/{name}")  # 401
        text = (await http.get("/metrics", headers=auth)).text
    assert not [junk for junk in sent if junk in text or junk.lower() in text]
    series = SERIES.findall(text)
    methods = {re.search(r'method="([^"]*)"', s).group(1) for s in series}
    routes = {re.search(r'route="([^"]*)"', s).group(1) for s in series}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert "other" in methods
    assert routes <= {"unmatched", "/predict", "/models/{name}", "/ready", "/metrics"}, routes
    assert len(series) < 30, series
    assert len(text) < 20_000


@ON_SESSION_LOOP
async def test_head_health_and_ready_answer_like_get(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready"):
        head = await client.head(path)
        assert head.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["x-request-id"]


@ON_SESSION_LOOP
async def test_a_long_model_name_in_the_path_is_422_and_not_echoed(
        client: httpx.AsyncClient) -> None:
    name = "n" * 10_000
    r = await client.get(f"/models/{name}")
    assert r.status_code == 422, r.status_code
    assert len(r.content) < 500 and "nnnnnnnnnn" not in r.text
    assert (await client.get("/models/" + "n" * 128)).status_code == 404
    r = await client.post(f"/predict?model={name}", files={"file": ("a.jpg", jpeg("red"))})
    assert r.status_code == 422 and "nnnnnnnnnn" not in r.text  # the same bound as the path


def _parts(field: str, count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i}.jpg", jpeg("red", seed=i, size=(8, 8)), "image/jpeg"))
            for i in range(count)]


@ON_SESSION_LOOP
async def test_too_many_images_is_413_from_our_own_count(
        client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # the parser's wording is its own business: reword its message, the answer must not change
    original = MultiPartException.__init__
    monkeypatch.setattr(MultiPartException, "__init__",
                        lambda self, message: original(self, "limit exceeded"))
    for files in (_parts("file", 20), _parts("file", 1) + _parts("other", 30)):
        r = await client.post("/predict", files=files)
        assert r.status_code == 413, r.text
        assert "more than 16 images" in r.json()["detail"]
    # a body that breaks after a few files is malformed, not too large
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
            + jpeg("red") + b"\r\n--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n")
    r = await client.post("/predict", content=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("key", ["clé", "ключ", "tab\tkey", "with space", "é"])
def test_a_key_headers_cannot_carry_is_refused_at_start_up(
        key: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="visible ASCII"):
        Settings(api_keys=["fine-key", key])
    with pytest.raises(SystemExit) as stopped:
        parse_settings(["--api-key", key])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "API key number 1" in err and "visible ASCII" in err and key not in err


@ON_SESSION_LOOP
async def test_a_request_cut_short_by_shutdown_gets_json_503(make_checkpoint_dir) -> None:
    app = create_app(fast_settings(make_checkpoint_dir("colors")))
    sent: list[dict] = []
    started = asyncio.Event()

    async def slow_upload() -> dict:  # the head has arrived; the body never finishes
        started.set()
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": "/predict", "raw_path": b"/predict",
             "root_path": "", "scheme": "http", "query_string": b"",
             "server": ("test", 80), "client": ("test", 1), "state": {},
             "headers": [(b"content-type", b"image/png"), (b"content-length", b"1000")]}
    async with app.router.lifespan_context(app):
        while not inside(app).registry.ready:
            await asyncio.sleep(0.05)
        task = asyncio.ensure_future(app(scope, slow_upload, send))
        await started.wait()
        inside(app).registry.begin_shutdown()  # SIGTERM turns the service to stopping first,
        task.cancel()  # then the server cancels what is left when its shutdown timeout runs out
        await asyncio.wait({task})
    assert not task.cancelled() and task.exception() is None
    start, body = sent
    assert start["status"] == 503
    assert (b"content-type", b"application/json") in start["headers"]
    detail = json.loads(body["body"])
    assert "stopped before this request finished" in detail["detail"] and detail["request_id"]


@ON_SESSION_LOOP
async def test_head_of_the_page_answers_like_get(client: httpx.AsyncClient) -> None:
    for path in ("/", "/page/app.js"):
        get, head = await client.get(path), await client.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


@ON_SESSION_LOOP
async def test_every_json_answer_says_nosniff(client: httpx.AsyncClient) -> None:
    answers = [
        await client.get("/health"), await client.get("/models"),
        await client.get("/models/nope"),  # 404
        await client.get("/no-such-route"),  # 404 with no route
        await client.post("/predict?top_k=0", files={"file": ("a.jpg", jpeg("red"))}),  # 422
        await client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"}),
        await client.post("/predict", files={"file": ("a.jpg", jpeg("red"))}),  # 200
        await client.request("DELETE", "/predict"),  # 405
    ]
    for r in answers:
        assert r.headers["content-type"].startswith("application/json"), r.request.url
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], r.request.url
    page = await client.get("/")  # sets its own: still one
    assert page.headers.get_list("x-content-type-options") == ["nosniff"]


@ON_SESSION_LOOP
async def test_no_redirect_is_built_from_the_host_header(client: httpx.AsyncClient) -> None:
    for path in ("/models/", "/predict/", "/health/"):
        r = await client.get(path, headers={"Host": "evil.example"})
        assert r.status_code in (404, 405), (path, r.status_code)
        assert "location" not in r.headers and "evil.example" not in r.text


def _encoded_name_part(disposition: str) -> bytes:
    return (f"--b\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n"
            .encode() + jpeg("red") + b"\r\n--b--\r\n")


@ON_SESSION_LOOP
@pytest.mark.parametrize(("disposition", "filename"), [
    ("form-data; name=\"file\"; filename*=UTF-8''na%C3%AFve%20%E2%82%AC.jpg", "naïve €.jpg"),
    ("form-data; name=\"file\"; filename=\"plain.jpg\"; filename*=utf-8''%C3%A9t%C3%A9.jpg",
     "été.jpg"),  # RFC 6266: filename* wins
    ("form-data; name=\"file\"; filename*=iso-8859-1'fr'%E9t%E9.jpg", "été.jpg"),
    ("form-data; name=\"file\"; filename*=UTF-8''two%0D%0Alines.jpg", "two??lines.jpg"),
])
async def test_a_part_named_with_filename_star_is_a_file(
        client: httpx.AsyncClient, disposition: str, filename: str) -> None:
    r = await client.post("/predict", content=_encoded_name_part(disposition),
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200, r.text
    result, = r.json()["results"]
    assert result["filename"] == filename
    assert result["predictions"][0]["label"] == "red"


@ON_SESSION_LOOP
async def test_filename_star_parts_count_against_the_image_limit(
        client: httpx.AsyncClient) -> None:
    part = _encoded_name_part("form-data; name=\"file\"; filename*=UTF-8''x.jpg")
    body = part.removesuffix(b"--b--\r\n") * 17 + b"--b--\r\n"
    r = await client.post("/predict", content=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "more than 16 images" in r.json()["detail"], r.text


@pytest.mark.parametrize(("trusted", "seen"), [
    ([], (("127.0.0.1", 40000), "http")),  # the default: no proxy is believed
    (["10.0.0.0/8"], (("127.0.0.1", 40000), "http")),  # a proxy elsewhere
    (["127.0.0.1"], (("7.7.7.7", 0), "https")),
])
async def test_forwarded_headers_are_believed_only_from_named_proxies(
        checkpoint_root: Path, trusted: list[str], seen: tuple) -> None:
    from app.process.server import server_config

    settings = fast_settings(checkpoint_root, forwarded_allow_ips=trusted)
    app = create_app(settings)
    config = server_config(app, settings)
    config.load()
    scopes: list[dict] = []

    async def inner(scope, receive, send) -> None:
        scopes.append(scope)

    outer = config.loaded_app  # whatever uvicorn wraps around the app; `inner` takes its place
    holder = outer
    while holder is not app and getattr(holder, "app", None) is not app:
        holder = holder.app
    if holder is app:
        outer = inner
    else:
        holder.app = inner
    await outer({"type": "http", "scheme": "http", "client": ("127.0.0.1", 40000),
                 "headers": [(b"x-forwarded-for", b"7.7.7.7"),
                             (b"x-forwarded-proto", b"https")]}, None, None)
    assert (tuple(scopes[0]["client"]), scopes[0]["scheme"]) == seen


def test_forwarded_allow_ips_takes_addresses_and_networks_only() -> None:
    assert Settings(forwarded_allow_ips="10.0.0.1, fd00::/8,*").forwarded_allow_ips == [
        "10.0.0.1", "fd00::/8", "*"]
    assert parse_settings(["--forwarded-allow-ips", "192.168.1.0/24"]).forwarded_allow_ips \
        == ["192.168.1.0/24"]
    with pytest.raises(ValidationError, match="neither an IP address"):
        Settings(forwarded_allow_ips="proxy.example")


@ON_SESSION_LOOP
async def test_keys_from_a_key_file_are_required_and_kept_out_of_argv(
        checkpoint_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key a line\n\nfile-key-1\n  file-key-2  \n")
    from_flag = parse_settings(["--api-key-file", str(key_file), "--api-key", "flag-key"])
    assert from_flag.api_key_values() == [b"flag-key", b"file-key-1", b"file-key-2"]
    monkeypatch.setenv("RESNET_SERVE_API_KEY_FILE", str(key_file))
    from_env = Settings()
    assert from_env.api_key_values() == [b"file-key-1", b"file-key-2"]
    assert "file-key" not in json.dumps(from_env.public_dict())
    settings = fast_settings(checkpoint_root, api_key_file=key_file)
    async with running_app(settings, wait_ready=False) as (http, _app):
        assert (await http.get("/models")).status_code == 401
        assert (await http.get("/models", headers={"X-API-Key": "file-key-2"})).status_code \
            == 200
    for text, problem in (("good-key\nwith space\n", "line 2 of the API key file"),
                          ("# nothing but comments\n\n", "holds no key")):
        key_file.write_text(text)
        with pytest.raises(ValidationError, match=problem) as refused:
            Settings(api_key_file=key_file)
        assert "good-key" not in str(refused.value) and "with space" not in str(refused.value)
    with pytest.raises(SystemExit):
        parse_settings(["--api-key-file", str(tmp_path / "missing")])
    assert "cannot read the API key file" in capsys.readouterr().err


@ON_SESSION_LOOP
async def test_the_docs_page_is_open_offline_and_its_api_description_is_not(
        checkpoint_root: Path) -> None:
    settings = fast_settings(checkpoint_root, default_model="colors", api_keys=["docs-key"])
    async with running_app(settings, wait_ready=False) as (http, _app):
        page = await http.get("/docs")  # what a browser asks for first, with no way to add a key
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "/docs/swagger-ui-bundle.js" in links and "/docs/docs.js" in links
        assert all(link.startswith(("/", "data:")) for link in links), links  # no other host
        for link in (x for x in links if x.startswith("/docs/")):
            asset = await http.get(link)
            assert asset.status_code == 200, link
            assert asset.headers["content-type"].startswith(("text/javascript", "text/css"))
        bundle = (await http.get("/docs/swagger-ui-bundle.js")).text
        assert "SwaggerUIBundle" in bundle and len(bundle) > 500_000
        script = (await http.get("/docs/docs.js")).text
        assert '"/openapi.json"' in script and "X-API-Key" in script
        assert (await http.get("/openapi.json")).status_code == 401
        described = await http.get("/openapi.json", headers={"X-API-Key": "docs-key"})
        assert described.status_code == 200 and "/predict" in described.json()["paths"]
