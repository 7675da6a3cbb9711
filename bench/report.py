"""Turn the JSON files of one `bench/run.sh` run into one Markdown table.

    python -m bench.report bench/results/2026-11-22T0300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.frontend_report import table as frontend_table


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # missing, or a run still writing it
        return None


def _server_rows(name: str, levels: list[dict], ceiling: float, peer: dict[tuple, dict]
                 ) -> list[str]:
    rows = []
    for lv in levels:
        key = (lv["concurrency"], lv["images_per_request"])
        base = peer.get(key)
        vs_peer = (f"{lv['images_per_s'] / base['images_per_s']:.2f}x"
                   if base and base["images_per_s"] else "")
        rows.append(
            f"| {name} | {lv['concurrency']} | {lv['images_per_request']} | "
            f"{lv['images_per_s']:.1f} | {lv['images_per_s'] / ceiling:.2f}x | {vs_peer} | "
            f"{lv['p50_ms']:.0f} | {lv['p95_ms']:.0f} | {lv['p99_ms']:.0f} | {lv['errors']} | "
            f"{lv['mean_batch'] if lv['mean_batch'] is not None else '-'} | "
            f"{lv['loadgen_cpu_pct']:.0f}% | {_server_cpu(lv)} |")
    return rows


def _server_cpu(level: dict) -> str:
    """Server CPU ms per image, with the split by thread name when there is more than one."""
    total = level.get("server_cpu_ms_per_image")
    if total is None:
        return ""
    parts = level.get("server_cpu_ms_per_image_by_thread", {})
    split = ", ".join(f"{name} {ms:.1f}" for name, ms in parts.items() if ms >= 0.05)
    return f"{total:.1f} ({split})" if len(parts) > 1 else f"{total:.1f}"


def render(run_dir: Path) -> str:
    """Markdown for every arch measured in `run_dir`."""
    out = [f"# Benchmark run {run_dir.name}", ""]
    for raw_path in sorted(run_dir.glob("raw-*.json")):
        arch = raw_path.stem.removeprefix("raw-")
        raw = _load(raw_path)
        if raw is None:
            continue
        env = raw["env"]
        ceiling = raw["ceiling_images_per_s"]
        backend = raw.get("backend", "torch")
        out += [
            f"## {arch} ({raw['precision']}, {backend}, crop {raw['crop']})", "",
            f"{env['device']}; torch {env['torch']}, torchvision {env['torchvision']}; "
            f"{env['torch_threads']} torch threads; allocator {env['allocator']}; {env['date']}",
            "",
            "Model alone (images/s by batch): " + ", ".join(
                f"{b}: {v}" for b, v in raw["model_images_per_s"].items()),
            f"ceiling {ceiling} at batch {raw['best_batch']}; whole pipeline (decode + "
            f"preprocess + model, one process) {raw['pipeline_images_per_s']} img/s, "
            f"{raw['pipeline_single_image_ms']} ms per single image.", "",
            "| server | conc. | img/req | img/s | x ceiling | x LitServe | p50 ms | p95 ms | "
            "p99 ms | errors | mean batch | loadgen CPU | server CPU ms/img |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lit = {(lv["concurrency"], lv["images_per_request"]): lv
               for lv in (_load(run_dir / f"load-litserve-{arch}.json") or [])}
        for name in ("service", "litserve", "naive"):
            levels = _load(run_dir / f"load-{name}-{arch}.json")
            if levels:
                out += _server_rows(name, levels, ceiling, lit if name != "litserve" else {})
        out.append("")
    frontend = _load(run_dir / "frontend.json")
    if isinstance(frontend, dict) and "headline" in frontend:
        out += ["## Front end: stand-in model (bench.frontend)", "", frontend_table(frontend), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Print the table and write it beside the JSON files as results.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    text = render(args.run_dir)
    (args.run_dir / "results.md").write_text(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
