"""The GPU command's parts that need no server: time boxes, docs/training.md's batch table, CPU by
stage, the GPU sampler, and the report when nothing fits (bench.gpu)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from bench.gpu.__main__ import WINDOW_S, main
from bench.gpu.bulk import own_rate
from bench.gpu.context import Context, run_bounded
from bench.gpu.gpu_sampler import GpuSampler, parse_smi_line
from bench.gpu.model_speed import compiled
from bench.gpu.plan import REPORT_RESERVE_S, STEPS, Clock, Plan, step_clock
from bench.gpu.readme_batches import BatchClaim, read_claims
from bench.gpu.report import SECTIONS
from bench.gpu.stages import DECODE_PROCESS, ProcessInfo, cpu_by_stage, serving_processes
from bench.gpu.training_speed import last_json


def test_a_step_never_eats_the_floors_of_the_steps_after_it() -> None:
    plan = Plan.full()
    run = Clock.start(100)
    clock = step_clock(run, plan, "server", ["training", "bulk", "compile"])
    floors = plan.step_seconds["training"][1] + plan.step_seconds["bulk"][1]
    assert clock.left() == pytest.approx(100 - floors - 5, abs=1)  # 5: the report's reserve
    assert step_clock(Clock.start(10_000), plan, "tests", []).left() == pytest.approx(
        plan.step_seconds["tests"][0], abs=1)


def test_the_full_plan_leaves_set_up_a_minute_of_the_window() -> None:
    plan = Plan.full()
    capped = sum(plan.step_seconds[s][0] for s in STEPS if s not in ("compile", "fit"))
    assert capped + REPORT_RESERVE_S <= WINDOW_S - 60  # compile and fit take what is left


def test_the_readme_table_gives_every_recommended_batch() -> None:
    claims = read_claims()
    assert BatchClaim(8, "resnet50", True, 16, 4) in claims  # "16 x 4" at 8 GiB
    assert BatchClaim(80, "resnet50", True, 256) in claims  # "(128 fit at 40 GiB, 256 at 80)"
    assert {c.gpu_gib for c in claims} == {8, 12, 24, 40, 80}
    assert all(c.batch & (c.batch - 1) == 0 for c in claims)  # powers of two, as computed


def test_a_readme_without_the_table_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no table"):
        read_claims(tmp_path / "README.md")


def _tree(workers: int) -> dict[int, ProcessInfo]:
    """A root (pid 1) with multiprocessing helpers, `workers` serving children (none: the
    root serves), and a decode process under each server's forkserver."""
    table = {1: ProcessInfo("python", 0, False), 2: ProcessInfo("python", 1, True)}
    servers = list(range(10, 10 + workers)) or [1]
    for pid in servers:
        if pid != 1:
            table[pid] = ProcessInfo("python", 1, False)
        table[pid + 100] = ProcessInfo("python", pid, True)  # forkserver
        table[pid + 200] = ProcessInfo(DECODE_PROCESS, pid + 100, False)
    return table


def test_cpu_by_stage_in_one_process_and_under_a_supervisor() -> None:
    single = _tree(0)
    before = {"1/1": ("main", 1.0), "1/5": ("compute", 1.0), "201/201": ("main", 0.0)}
    after = {"1/1": ("main", 3.0), "1/5": ("compute", 1.5), "1/6": ("decode", 0.25),
             "201/201": ("main", 2.0), "2/2": ("main", 0.5)}
    assert cpu_by_stage(before, after, 1, single) == {
        "event loop": 2.0, "decode processes": 2.0, "compute": 0.5, "other processes": 0.5,
        "decode hand-off": 0.25}
    assert serving_processes(1, single) == 1
    tree = _tree(2)
    after = {"1/1": ("main", 0.5), "10/10": ("main", 1.0), "11/11": ("main", 2.0),
             "11/20": ("load-m", 0.25), "210/210": ("main", 1.0)}
    assert cpu_by_stage({}, after, 1, tree) == {
        "event loop": 3.0, "decode processes": 1.0, "supervisor": 0.5, "other threads": 0.25}
    assert serving_processes(1, tree) == 2


def test_the_sampler_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nwhile true; do echo '37, 1024'; echo '[N/A], 5'; "
                   "echo '41, 2048'; sleep 0.02; done\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(GpuSampler, "_nvml_handle", lambda self: None)
    with GpuSampler(interval_s=0.02) as sampler:
        time.sleep(0.3)
    result = sampler.result()
    assert result["source"] == "nvidia-smi" and result["samples"] >= 2
    assert result["util_max_pct"] == 41 and result["memory_max_mib"] == 2048
    assert 37 <= result["util_mean_pct"] <= 41
    assert sampler._process is not None and sampler._process.poll() is not None  # stopped


def test_the_sampler_says_why_it_has_nothing(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(GpuSampler, "_nvml_handle", lambda self: None)
    with GpuSampler() as sampler:
        pass
    assert "nvidia-smi" in sampler.result()["unavailable"]
    assert parse_smi_line("[N/A], [N/A]") is None and parse_smi_line("5, 7") == (5.0, 7.0)


def test_compile_skips_what_would_not_fit_and_says_so(tmp_path: Path) -> None:
    ctx = Context(Plan.dry(), tmp_path, tmp_path)
    result = compiled(ctx, Clock.start(1.0))  # two compiles of 5 s each would not fit
    assert result["rows"] == []
    assert len(result["notes"]) == 2 and all("skipped" in n for n in result["notes"])


def test_with_no_time_every_section_says_it_was_skipped(tmp_path: Path) -> None:
    assert main(["--dry-run", "--budget-s", "0", "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [n for n, r in report["steps"].items() if r["status"] == "skipped"] == list(STEPS)
    text = (tmp_path / "gpu.md").read_text()
    for _, title in SECTIONS:
        section = text.split(f"### {title}\n", 1)[1]
        assert section.lstrip().startswith("**skipped**"), title


def test_the_output_parsers() -> None:
    assert last_json('{"not": "this"}\nlog line\n{\n  "a": 1\n}\n') == {"a": 1}
    with pytest.raises(ValueError):
        last_json("no json at all")
    assert own_rate("x: 4 rows, 4 added by this run in 1.0 s; 3.8 images/s\n") == 3.8
    assert own_rate("nothing") is None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_command_over_its_time_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(60)\n")
    started = time.monotonic()
    assert run_bounded([sys.executable, "-c", script], 3.0, tmp_path) is None
    assert time.monotonic() - started < 10
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    done = run_bounded([sys.executable, "-c", "print('hi')"], 30.0, tmp_path)
    assert done is not None and (done.returncode, done.stdout) == (0, "hi\n")
