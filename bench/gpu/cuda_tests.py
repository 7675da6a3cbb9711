"""The CUDA tests: `pytest -m gpu` over the test files that carry the mark, and its summary."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from bench.gpu.context import PYTHON, ROOT, Context, run_bounded
from bench.gpu.plan import Clock

logger = logging.getLogger(__name__)

NO_TESTS_COLLECTED = 5  # pytest's exit status when nothing was selected
_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|error|errors|xfailed|xpassed)\b")


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """The test files that mark something `gpu` (collecting only these keeps it quick)."""
    return sorted(str(path.relative_to(root)) for path in (root / "tests").rglob("test_*.py")
                  if "mark.gpu" in path.read_text(encoding="utf-8", errors="replace"))


def summary_line(output: str) -> str:
    """pytest's last summary line ("1 passed, 3 deselected in 2.1s"), or ''."""
    lines = [line.strip(" =") for line in output.splitlines() if _SUMMARY.search(line)]
    return lines[-1] if lines else ""


def run(ctx: Context, clock: Clock) -> dict:
    """Run the marked tests on whatever device this machine has; CUDA ones skip without."""
    files = gpu_test_files()
    if not files:
        return {"status": "ok", "note": "no test carries the gpu mark", "files": []}
    command = [PYTHON, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "-o", "addopts=", *files]
    started, limit = time.monotonic(), clock.left()
    done = run_bounded(command, limit, ctx.work_dir)
    if done is None:
        return {"status": "failed", "error": f"still running after its {limit:.0f} s",
                "files": files}
    output = done.stdout + done.stderr
    (ctx.out_dir / "cuda-tests.log").write_text(output)
    result = {"command": " ".join(["pytest", *command[3:]]), "files": files,
              "exit_status": done.returncode, "summary": summary_line(output),
              "seconds": round(time.monotonic() - started, 1)}
    if done.returncode in (0, NO_TESTS_COLLECTED):
        return {"status": "ok", **result}
    return {"status": "failed", "error": result["summary"] or output[-500:], **result}
