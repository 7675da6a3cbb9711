"""`bench/gpu.sh --dry-run`: the GPU command's every step, at toy sizes on this machine.

The command exists for the first GPU window, which may come long after its code was written;
running it here keeps it from rotting: the real server, the stand-in server's answer check
(a stand-in that answered probabilities where logits are expected once went unnoticed until
a benchmark failed), the load generator and the CPU accounting, the decoders, training and
compile paths all run once, and the report has every section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.report import SECTIONS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess,
                                                               Path]:
    out = tmp_path_factory.mktemp("gpu-dry-run")
    done = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PY": sys.executable})
    return done, out


def test_the_dry_run_exits_0_with_every_step_run(dry_run: tuple) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert set(steps) == {"tests", "model", "decode", "server", "training", "bulk", "compile",
                          "fit"}
    assert {n: r["status"] for n, r in steps.items() if r["status"] != "ok"} in (
        {"fit": "skipped"}, {"fit": "skipped", "bulk": "skipped"}), steps
    # fit: not in a dry run; bulk: only until `training predict` exists


def test_the_report_has_every_section(dry_run: tuple) -> None:
    done, out = dry_run
    text = (out / "gpu.md").read_text()
    for _, title in SECTIONS:
        assert f"### {title}" in text
    assert "**Dry run**" in text and "**failed**" not in text
    assert done.stdout == text  # what it prints is what it wrote


def test_the_servers_answered_and_were_accounted(dry_run: tuple) -> None:
    _, out = dry_run
    server = json.loads((out / "gpu.json").read_text())["steps"]["server"]
    assert server["standin"]["answer_check"] == "passed"
    assert server["service"]["workers"] == 1  # --workers 0 on the CPU
    for part in ("service", "explain", "standin"):
        levels = server[part]["levels"]
        assert levels, part
        for level in levels:
            assert level["ok"] > 0 and level["errors"] == 0, (part, level)
            assert "event loop" in level["cpu_ms_per_image_by_stage"], (part, level)
            assert "unavailable" in level["gpu"] or "util_mean_pct" in level["gpu"]
    assert [(lv["images_per_request"], lv["concurrency"]) for lv in
            server["service"]["levels"]] == [(1, 2), (8, 1)]
    assert server["litserve"]["status"] in ("ok", "unavailable")


def test_every_measuring_step_measured(dry_run: tuple) -> None:
    _, out = dry_run
    steps = json.loads((out / "gpu.json").read_text())["steps"]
    assert steps["tests"]["exit_status"] == 0 and steps["tests"]["files"]
    modes = {(r["precision"], r["mode"].split(" ")[0]) for r in
             steps["model"]["rows"] + steps["compile"]["rows"]}
    assert modes == {("bf16", "eager"), ("fp16", "eager"), ("bf16", "torch.compile"),
                     ("fp16", "torch.compile")}
    assert all(r["images_per_s"] for r in steps["model"]["rows"] + steps["compile"]["rows"])
    assert {r["decoder"].split(",")[0] for r in steps["decode"]["rows"]} == {
        "device decoder on cpu", "Pillow"}
    training = steps["training"]
    assert [r["precision"] for r in training["amp"]] == ["bf16", "fp16"]
    assert {(r["arch"], r["amp"]) for r in training["memory"]} == {
        ("resnet18", True), ("resnet18", False), ("resnet50", True), ("resnet50", False)}
