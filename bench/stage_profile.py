"""Where a server's event loop spends its CPU, by stage of a request, from py-spy samples.

py-spy (a sampling profiler that reads another process's stacks from outside, here with
native frames, so that the garbage collector shows) records the server's main thread, the
one that runs the event loop; each sample is given to a stage by its innermost frame that one
of `STAGES` claims (frames of general-purpose modules, such as contextlib or typing, and of
native code no stage names, are passed over to their caller). py-spy pauses the process for
each sample (without pausing, a sample can catch a coroutine chain half resumed and blame the
wrong frame), so the profiled pass is not a measured one.

py-spy samples a thread that is running or waiting for a core alike, and on a busy machine a
thread waits most right after a system call that wakes the client (the kernel hands the core
to the woken process). So the samples only split the thread's user time: those that end in
libc (system calls) are left out, and the kernel time the thread spent, read from /proc, is
its own stage. Each stage's milliseconds per request are its share of the user time per
request, measured in the runs that were not profiled.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

SYSCALLS = "in libc (system calls)"  # samples left out of the split of the user time
# (stage, substrings of a frame "function (path:line)"); the first stage naming the innermost
# frame that any stage names wins, so the more specific come first
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("garbage collector", ("gc_collect", "collect_generations", "gc_collect_main")),
    (SYSCALLS, ("(libc.so", "(libpthread")),
    ("json", ("orjson", "pydantic_core", "json/encoder", "json/__init__", "_answer_bytes",
              "render (", "JSONAnswer")),
    ("multipart", ("python_multipart", "multipart/", "formparsers", "app/api/multipart.py",
                   "_parse_multipart", "count_file_parts", "tempfile", "UploadFile",
                   "upload_parts", "MultipartReader")),
    ("body read", ("_read_body", "read_body", "starlette/requests.py", "body_bytes")),
    ("auth", ("app/api/auth.py",)),
    ("metrics", ("prometheus_client", "app/metrics.py")),
    ("logging", ("logging/", "app/logs.py")),
    ("answers", ("answers (", "models/", "torch/")),
    ("admission, decode, batching", ("app/serving/",)),
    ("route", ("app/api/routes/", "app/api/transport.py", "app/api/lean")),
    ("routing, dependencies", ("fastapi/", "starlette/routing.py", "starlette/_exception_handler",
                               "starlette/applications.py", "starlette/middleware/exceptions",
                               "starlette/_utils", "starlette/datastructures", "pydantic/",
                               "app/api/deps.py", "anyio/")),
    ("middleware", ("app/api/middleware.py", "starlette/middleware/")),
    ("HTTP (server, parser)", ("h11/", "httptools", "uvicorn/", "app/process/", "socket.py",
                               "bench/floor_server.py")),
    ("asyncio", ("asyncio/", "selectors.py", "uvloop")),
]
KERNEL = "kernel (system calls: socket I/O, epoll)"
_FRAME = re.compile(r"^(?P<text>.*) (?P<count>\d+)$")


def py_spy() -> str | None:
    """The py-spy beside this interpreter or on PATH, or None."""
    beside = Path(__import__("sys").executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, *, rate: int = 100) -> Path:
    """Sample `pid`'s threads for `seconds` into raw collapsed stacks, native frames too."""
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "record", "-p", str(pid), "-d", str(max(1, round(seconds))),
               "-r", str(rate), "-f", "raw", "--threads", "--native", "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return out


def stage_of(frames: list[str]) -> str:
    """The stage of one sample, its frames listed outermost first."""
    for frame in reversed(frames):
        for stage, marks in STAGES:
            if any(mark in frame for mark in marks):
                return stage
    return "other"


def main_thread_stages(raw: str, pid: int) -> Counter[str]:
    """Samples per stage of the main thread of `pid` in py-spy's raw output."""
    counts: Counter[str] = Counter()
    prefix = f"thread ({pid})"
    for line in raw.splitlines():
        match = _FRAME.match(line.strip())
        if match is None or not line.startswith(prefix):
            continue
        frames = match.group("text").split(";")[1:]  # [0] is the thread's name
        counts[stage_of(frames)] += int(match.group("count"))
    return counts


def top_frames(raw: str, pid: int, *, limit: int = 25) -> list[tuple[str, int]]:
    """The main thread's most frequent innermost frames (the profile behind the stages)."""
    counts: Counter[str] = Counter()
    prefix = f"thread ({pid})"
    for line in raw.splitlines():
        match = _FRAME.match(line.strip())
        if match is not None and line.startswith(prefix):
            counts[match.group("text").split(";")[-1]] += int(match.group("count"))
    return counts.most_common(limit)


def split_ms(counts: Counter[str], user_ms: float, kernel_ms: float = 0.0) -> dict[str, float]:
    """`user_ms` split by the stages' shares of the samples outside libc, and `kernel_ms` as
    the kernel's stage; largest first."""
    user = {stage: n for stage, n in counts.items() if stage != SYSCALLS}
    total = sum(user.values())
    out = {stage: user_ms * n / total for stage, n in user.items()} if total else {}
    if kernel_ms:
        out[KERNEL] = kernel_ms
    return {stage: round(ms, 3) for stage, ms in sorted(out.items(), key=lambda kv: -kv[1])}


def user_and_kernel_seconds(pid: int, tid: int | None = None) -> tuple[float, float]:
    """The user and kernel CPU seconds of thread `tid` of `pid` (its main thread by default)."""
    stat = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick
