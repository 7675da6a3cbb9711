"""A server's CPU time by stage, from two bench.load.thread_cpu snapshots of its process tree.

Stages, for the service: `supervisor` (the process that was started, when it has worker
processes), `event loop` (each serving process's first thread: HTTP, multipart, routing,
JSON), `decode hand-off` (its `decode` threads, which feed the decode processes and wait),
`compute` (its `compute` thread and the OpenMP threads that inherit the name: the model),
`decode processes` (the bounded decoders, named resnet-decode), `other threads` and
`other processes` (multiprocessing's helpers, the OIP JSON parsers). For LitServe,
`event loop` is the first thread of each of its processes (API servers and inference
workers alike).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from app.serving.decode_box import PROCESS_NAME

Snapshot = dict[str, tuple[str, float]]
DECODE_PROCESS = PROCESS_NAME.decode()
THREAD_STAGES = {"main": "event loop", "decode": "decode hand-off", "compute": "compute"}
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc says of one process of the tree."""

    name: str
    parent: int
    helper: bool  # multiprocessing's resource tracker or forkserver: serves nothing


def process_table(snapshot: Snapshot, proc: Path = Path("/proc")) -> dict[int, ProcessInfo]:
    """Every process of a snapshot that is still alive."""
    table = {}
    for pid in {int(key.split("/", 1)[0]) for key in snapshot}:
        try:
            stat = (proc / str(pid) / "stat").read_text()
            command = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        table[pid] = ProcessInfo(name, int(stat.rsplit(")", 1)[1].split()[1]),
                                 any(h in command for h in _HELPERS))
    return table


def workers(root: int, processes: dict[int, ProcessInfo]) -> set[int]:
    """The started process's children that serve: neither decoders nor helpers."""
    return {pid for pid, info in processes.items()
            if info.parent == root and info.name != DECODE_PROCESS and not info.helper}


def stage_of(pid: int, thread: str, root: int, processes: dict[int, ProcessInfo]) -> str:
    """The stage a thread's CPU time counts under (see the module's docstring)."""
    info = processes.get(pid)
    if info is not None and info.name == DECODE_PROCESS:
        return "decode processes"
    serving = workers(root, processes)
    if pid == root and serving:
        return "supervisor"
    if pid == root or pid in serving:
        return THREAD_STAGES.get(thread, "other threads")
    return "other processes"


def cpu_by_stage(before: Snapshot, after: Snapshot, root: int,
                 processes: dict[int, ProcessInfo]) -> dict[str, float]:
    """CPU seconds spent between two snapshots of `root`'s tree, summed by stage."""
    spent: dict[str, float] = defaultdict(float)
    for key, (thread, seconds) in after.items():
        pid = int(key.split("/", 1)[0])
        spent[stage_of(pid, thread, root, processes)] += seconds - before.get(key, ("", 0.0))[1]
    return {stage: s for stage, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s > 0}


def serving_processes(root: int, processes: dict[int, ProcessInfo]) -> int:
    """How many processes serve requests: the workers, or the started process alone."""
    return len(workers(root, processes)) or 1
