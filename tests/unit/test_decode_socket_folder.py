"""The decode processes start under a TMPDIR too long for a Unix socket's path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DECODE_ONE = """
import io, os, time
from PIL import Image
from app.serving.decode_box import DecodeProcess
from app.serving.imaging import DEFAULT_LIMITS
from models.card import Preprocessing
from models.preprocessing import EvalCrop
buffer = io.BytesIO()
Image.new("RGB", (40, 30), "red").save(buffer, "JPEG")
read, _write = os.pipe()
box = DecodeProcess(DEFAULT_LIMITS)
pixels = box.run(EvalCrop(Preprocessing(resize=32, crop=32)), buffer.getvalue(), 10**6,
                 deadline=time.monotonic() + 60, cancel_fd=read)
print(pixels.shape)
"""


def test_a_long_tmpdir_still_starts_the_decode_processes(tmp_path: Path) -> None:
    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    done = subprocess.run([sys.executable, "-c", DECODE_ONE], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TMPDIR": str(long_tmp)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(32, 32, 3)"
