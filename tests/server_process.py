"""A real `python -m app` process for end-to-end tests: started on a free port, waited on
until every model it finds is loaded, stopped (and killed if it will not stop) afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(checkpoint_dir: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None,
            headers: dict[str, str] | None = None, models: int | None = None,
            timeout: float = 90.0) -> Iterator[str]:
    """Serve `checkpoint_dir` on the CPU with `flags`; yields `http://127.0.0.1:<port>` once
    /models lists every model (or `models` of them) as loaded and /ready says every worker
    process is."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--checkpoint-dir", str(checkpoint_dir),
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_loaded(proc, url, log, headers or {}, models, timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_loaded(proc: subprocess.Popen, url: str, log, headers: dict[str, str],
                 models: int | None, timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while True:
        try:
            found = httpx.get(f"{url}/models", headers=headers, timeout=2).json()["models"]
            if found and all(m["status"] == "loaded" for m in found) \
                    and (models is None or len(found) == models) \
                    and httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return  # /ready: every worker process has its models, not only this one
        except (httpx.TransportError, ValueError, KeyError, TypeError):
            pass
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            log.seek(0)
            pytest.fail(f"server did not load its models:\n{log.read()}")
        time.sleep(0.2)
