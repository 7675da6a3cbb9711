"""Driving wrk (a C load generator) with pre-built multipart uploads, and reading its results.

wrk speaks HTTP/1.1 and keeps every connection alive; ApacheBench sends HTTP/1.0, whose
"Keep-Alive" h11 (uvicorn's parser) does not honour, so under ab each request would pay for a
new connection. The request bodies are built once, written to files, and rotated by a small
Lua script that also prints the totals as one JSON line when the run ends.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BOUNDARY = "frontend-bench-7d3f9a61c2e84b05"
RESULT_TAG = "WRK_RESULT "

_SCRIPT = """\
local paths = {%(paths)s}
local requests, n = {}, 0

function init(args)
  for _, path in ipairs(paths) do
    local f = assert(io.open(path, "rb"))
    local body = f:read("*a")
    f:close()
    table.insert(requests, wrk.format("POST", "%(path)s",
      {["Content-Type"] = "%(content_type)s"}, body))
  end
end

function request()
  n = n %% #requests + 1
  return requests[n]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('%(tag)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d, "max_us": %%d}\\n', summary.requests, summary.duration,
    summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run saw: responses, seconds, error counts and latency in ms."""

    requests: int
    seconds: float
    http_errors: int  # responses with a status of 400 and above (as wrk counts them)
    socket_errors: int  # connect + read + write + timeout
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def ok(self) -> int:
        """Responses with a 2xx/3xx status."""
        return self.requests - self.http_errors

    @property
    def errors(self) -> int:
        """Every request that did not get a good answer."""
        return self.http_errors + self.socket_errors


def content_type(boundary: str = BOUNDARY) -> str:
    """The Content-Type header of a body from `multipart_body`."""
    return f"multipart/form-data; boundary={boundary}"


def multipart_body(files: list[tuple[str, bytes]], *, field: str = "file",
                   boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body with one part per (filename, JPEG bytes), all in `field`."""
    if any(boundary.encode() in data for _, data in files):
        raise ValueError("the boundary occurs inside a file; choose another")
    parts = []
    for filename, data in files:
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: image/jpeg\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def request_bodies(jpegs: list[bytes], images: int) -> list[bytes]:
    """One body per starting photo, each holding `images` consecutive photos (wrapping)."""
    return [multipart_body([(f"img{j}.jpg", jpegs[(i + j) % len(jpegs)])
                            for j in range(images)]) for i in range(len(jpegs))]


def write_script(directory: Path, bodies: list[bytes], *, path: str = "/predict") -> Path:
    """Write the bodies and the Lua script that rotates them into `directory`; the script."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, body in enumerate(bodies):
        file = directory / f"body-{i:03d}.bin"
        file.write_bytes(body)
        files.append(file.resolve())
    script = directory / "rotate.lua"
    script.write_text(_SCRIPT % {"paths": ", ".join(json.dumps(str(f)) for f in files),
                                 "path": path, "content_type": content_type(),
                                 "tag": RESULT_TAG})
    return script


def parse_output(stdout: str) -> WrkResult:
    """The totals from the script's JSON line in wrk's output; ValueError when it is missing."""
    match = re.search(re.escape(RESULT_TAG) + r"(\{.*\})", stdout)
    if match is None:
        raise ValueError(f"no {RESULT_TAG.strip()} line in wrk's output: {stdout[-500:]!r}")
    raw = json.loads(match.group(1))
    return WrkResult(
        requests=raw["requests"], seconds=raw["duration_us"] / 1e6, http_errors=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000, max_ms=raw["max_us"] / 1000)


def wrk_binary() -> str | None:
    """The wrk on PATH (Debian: apt-get install wrk), or None."""
    return shutil.which("wrk")


def run_wrk(url: str, script: Path, *, concurrency: int, seconds: float, threads: int = 1,
            timeout_s: float = 60.0) -> WrkResult:
    """Run wrk against `url` for `seconds` with `concurrency` keep-alive connections."""
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk)")
    command = [binary, "-t", str(max(1, min(threads, concurrency))), "-c", str(concurrency),
               "-d", f"{max(1, round(seconds))}s", "--timeout", f"{round(timeout_s)}s",
               "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=seconds + timeout_s + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_output(done.stdout)
