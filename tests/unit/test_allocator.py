"""The launcher's allocator choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.process.allocator import find_tcmalloc, loaded_allocator, reexec_with_fast_allocator

PROBE = "from app.process.allocator import loaded_allocator; print(loaded_allocator())"


def _probe(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_plain_process_reports_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _probe(env) == "glibc"


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed")
def test_preloaded_tcmalloc_is_detected() -> None:
    assert _probe({**os.environ, "LD_PRELOAD": find_tcmalloc()}) == "tcmalloc"


@pytest.mark.parametrize("choice, environ", [
    ("system", {}),
    ("auto", {"RESNET_SERVE_ALLOCATOR_REEXEC": "1"}),
    ("auto", {"LD_PRELOAD": "libjemalloc.so.2"}),
])
def test_no_restart_when_not_wanted(choice: str, environ: dict[str, str]) -> None:
    # returning at all (instead of replacing this test process) is the behaviour under test
    assert reexec_with_fast_allocator(choice, ["--port", "0"], environ) is None
    assert loaded_allocator() in ("glibc", "tcmalloc", "jemalloc", "mimalloc", "unknown")
