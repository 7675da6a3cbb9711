"""The real server at the socket level: idle, slow and surplus connections, and shutdown.

Each test holds raw sockets against `python -m app` the way a slow or hostile client would,
and checks that the server closes them in bounded time, answers in its JSON shape, and
never runs out of file descriptors.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.process.connections import connection_cap
from tests.server_process import ROOT, free_port
from tests.serving_helpers import metric

pytestmark = pytest.mark.slow

FD_LIMIT = 200  # the server's open-file limit in the flood test
GIVE_UP = 20.0  # seconds after which a test stops waiting for the server to act


def start_server(checkpoint_root: Path, log_path: Path, *flags: str,
                 fd_limit: int | None = None) -> tuple[subprocess.Popen, str, int]:
    """`python -m app` over the colour checkpoints on a free port, once it is ready."""
    port = free_port()
    command = [sys.executable, "-m", "app", "--checkpoint-dir", str(checkpoint_root),
               "--default-model", "colors", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--torch-threads", "1", "--no-warmup", *flags]
    if fd_limit is not None:  # the shell lowers the limit, then becomes the server
        command = ["sh", "-c", f'ulimit -n {fd_limit} && exec "$@"', "sh", *command]
    with log_path.open("w") as log:  # the server writes to its own copy
        proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ), stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    give_up = time.monotonic() + 90
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url, port
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            pytest.fail(f"server did not become ready:\n{log_path.read_text()}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """Kill the server if it still runs."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def quick_server(request: pytest.FixtureRequest, checkpoint_root: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    """A server with one-second idle and header deadlines and a two-second body deadline,
    with each HTTP parser."""
    log_path = tmp_path_factory.mktemp("quick") / "server.log"
    proc, url, port = start_server(checkpoint_root, log_path, "--keepalive-timeout", "1",
                                   "--header-timeout", "1", "--body-timeout", "2",
                                   "--http-parser", request.param)
    yield url, port, log_path
    stop(proc)


def connect(port: int) -> socket.socket:
    """A client socket that gives up reading after GIVE_UP seconds."""
    return socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def trickle(sock: socket.socket, first: bytes, drip: bytes) -> bytes:
    """Send `first`, then `drip` every 0.2 s until the server closes; what it answered."""
    sock.sendall(first)
    sock.settimeout(0.2)
    data, give_up = b"", time.monotonic() + GIVE_UP
    while time.monotonic() < give_up:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        except TimeoutError:
            try:
                sock.sendall(drip)
            except (BrokenPipeError, ConnectionResetError):
                return data + read_until_closed(sock)
        except ConnectionResetError:
            return data
    raise AssertionError(f"the server kept a trickling connection for {GIVE_UP} s: {data!r}")


def answers_from(socks: list[socket.socket], expected: int) -> list[bytes]:
    """What the sockets the server answered and closed received: waits for `expected` of
    them, then a moment more to see that no other one is answered."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        answers: list[bytes] = []
        give_up = time.monotonic() + GIVE_UP
        while time.monotonic() < give_up:
            ready = selector.select(timeout=0.5 if len(answers) >= expected else 1.0)
            if not ready and len(answers) >= expected:
                return answers
            for key, _ in ready:
                selector.unregister(key.fileobj)
                answers.append(read_until_closed(key.fileobj))  # type: ignore[arg-type]
    return answers


def json_error(response: bytes, status: int) -> dict:
    """The JSON error body of a raw response with `status`."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response
    assert b"content-type: application/json" in head.lower(), head
    parsed = json.loads(body)
    assert set(parsed) == {"detail", "request_id"}, parsed
    return parsed


def test_idle_connections_are_closed(quick_server) -> None:
    _url, port, _log = quick_server
    with connect(port) as fresh:  # never sends a byte
        assert read_until_closed(fresh) == b""
    with connect(port) as used:  # idle after one answer
        used.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_until_closed(used).startswith(b"HTTP/1.1 200 ")


def test_a_request_head_sent_byte_by_byte_gets_408(quick_server) -> None:
    url, port, _log = quick_server
    with connect(port) as slow:
        answer = trickle(slow, b"GET /health HTTP/1.1\r\nHost: t\r\n", b"X")
    assert "request head did not arrive within 1 s" in json_error(answer, 408)["detail"]
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert metric(text, "resnet_serve_connection_events_total", event="header_timeout") >= 1


@pytest.mark.parametrize("path", ["/predict", "/models/reload"])
def test_a_body_sent_byte_by_byte_is_cut_off(quick_server, path: str) -> None:
    url, port, _log = quick_server
    head = (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    with connect(port) as slow:
        answer = trickle(slow, head + b"\x89PNG", b"x")
    if path == "/predict":  # still reading the body: 408
        assert "request body did not arrive within 2 s" in json_error(answer, 408)["detail"]
    else:  # answered without reading the body, then closed all the same
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200


SMUGGLED = b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize(("request_bytes", "reason"), [
    # framed by Transfer-Encoding, the smuggled request follows the empty chunked body; a
    # proxy framing by Content-Length would have sent it as part of this one's body
    (b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: " + str(5 + len(SMUGGLED)).encode()
     + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
     "both Content-Length and Transfer-Encoding"),
    (b"GET /health HTTP/1.1\nHost: t\n\n" + SMUGGLED, "bare LF"),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX-A: b\nX-B: c\r\n\r\n" + SMUGGLED, "bare LF"),
])
def test_ambiguous_framing_gets_400_and_the_connection_closes(
        quick_server, request_bytes: bytes, reason: str) -> None:
    url, port, log_path = quick_server
    with connect(port) as sock:
        sock.sendall(request_bytes)
        answer = read_until_closed(sock)
    assert reason in json_error(answer, 400)["detail"]
    assert answer.count(b"HTTP/1.1 ") == 1  # the request after it was never read
    assert b"\r\nx-content-type-options: nosniff\r\n" in answer
    with connect(port) as sock:  # a pipelined request is checked when its turn comes
        sock.sendall(SMUGGLED + b"GET /health HTTP/1.1\nHost: t\n\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 400 " in answer and b"bare LF" in answer
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert "Traceback" not in log_path.read_text()


def test_forwarded_headers_from_a_local_client_are_not_believed(quick_server) -> None:
    url, _port, log_path = quick_server
    r = httpx.get(f"{url}/health?forwarded-probe", timeout=10,
                  headers={"X-Forwarded-For": "7.7.7.7", "X-Forwarded-Proto": "https"})
    assert r.status_code == 200
    give_up = time.monotonic() + GIVE_UP
    while not (lines := [line for line in log_path.read_text().splitlines()
                         if "forwarded-probe" in line]):
        assert time.monotonic() < give_up, "no access log line"
        time.sleep(0.1)
    assert "127.0.0.1:" in lines[0] and "7.7.7.7" not in lines[0], lines


def pipeline_unread(port: int, request: bytes, count: int) -> socket.socket:
    """A client that sends `count` copies of `request` at once and never reads: a small
    receive buffer and segment size, so the server's send buffers fill after a few answers
    instead of megabytes of them."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.settimeout(GIVE_UP)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request * count)
    return sock


def closed_by_server(sock: socket.socket, give_up: float) -> bool:
    """Whether the server closes `sock` (an end or a reset after whatever it had sent)
    before the monotonic time `give_up`."""
    with contextlib.suppress(ConnectionResetError):
        while (left := give_up - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                if not sock.recv(65536):
                    return True
            except TimeoutError:
                return False
        return False
    return True


def test_clients_that_pipeline_and_never_read_are_closed(
        checkpoint_root: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    proc, url, port = start_server(checkpoint_root, log_path, "--max-connections", "8",
                                   "--write-timeout", "1")
    asked, unread = 64, []
    try:
        began = time.monotonic()
        # more sockets than the server serves, each asking for the page's script (open to
        # all) again and again without reading a byte of the answers
        request = b"GET /page/app.js HTTP/1.1\r\nHost: t\r\n\r\n"
        unread += [pipeline_unread(port, request, asked) for _ in range(12)]
        while (probe := httpx.get(f"{url}/health", timeout=10)).status_code != 200:
            assert time.monotonic() - began < 8, f"/health still {probe.status_code}"
            time.sleep(0.1)
        give_up = time.monotonic() + 5
        assert all(closed_by_server(sock, give_up) for sock in unread)
        text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        for sock in unread:
            sock.close()
        stop(proc)
    assert metric(text, "resnet_serve_connection_events_total", event="write_timeout") >= 8
    # an answer waiting to leave holds the next request back: few of the asked were answered
    answered = metric(text, "resnet_serve_requests_total", route="/page/{file}",
                      method="GET", status="200")
    assert answered <= 8 * asked / 4, answered
    assert "Traceback" not in log_path.read_text()


def test_a_connection_flood_past_the_open_file_limit(
        checkpoint_root: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    proc, url, port = start_server(checkpoint_root, log_path, "--keepalive-timeout", "60",
                                   fd_limit=FD_LIMIT)
    cap = connection_cap(1000, FD_LIMIT)
    try:
        flood = [connect(port) for _ in range(FD_LIMIT + 100)]  # more sockets than it may open
        answered = answers_from(flood, expected=len(flood) - cap)
        # the ones over the cap were told at once, in the service's JSON shape; the others wait
        assert len(answered) == len(flood) - cap
        for answer in answered:
            assert json_error(answer, 503)["detail"].startswith("too many open connections")
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
        probe = httpx.get(f"{url}/health", timeout=10)  # a newcomer: refused at once too
        assert probe.status_code == 503 and probe.headers["retry-after"] == "1"
        for sock in flood:
            sock.close()
        give_up = time.monotonic() + GIVE_UP
        while (probe := httpx.get(f"{url}/health", timeout=10)).status_code != 200:
            assert time.monotonic() < give_up, probe.text
            time.sleep(0.1)
        text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop(proc)
    refused = sum(metric(text, "resnet_serve_connection_events_total", event=event)
                  for event in ("refused", "dropped"))
    assert refused >= len(answered) + 1
    log = log_path.read_text()
    assert log.count("connection limit reached") == 1, log[-3000:]
    assert "Too many open files" not in log and "Traceback" not in log


def test_a_request_still_uploading_at_the_shutdown_timeout_gets_json_503(
        checkpoint_root: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    proc, _url, port = start_server(checkpoint_root, log_path, "--shutdown-timeout", "1",
                                    "--body-timeout", "60")
    try:
        with connect(port) as uploader:
            uploader.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                             b"Content-Length: 100000\r\n\r\n\x89PNG")
            time.sleep(0.5)  # let the server start reading the body
            proc.send_signal(signal.SIGTERM)
            answer = read_until_closed(uploader)
        assert proc.wait(timeout=GIVE_UP) == 0
    finally:
        stop(proc)
    assert "stopped before this request finished" in json_error(answer, 503)["detail"]
    log = log_path.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
