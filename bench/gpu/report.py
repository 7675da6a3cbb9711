"""The GPU command's report as Markdown, ready to paste into docs/benchmarks.md.

One heading per item the command measures, always present: a step that did not run says
why (skipped, unavailable, failed) instead of leaving its section out.
"""

from __future__ import annotations

SECTIONS = (
    ("tests", "CUDA tests (`pytest -m gpu`)"),
    ("model", "Model only: images/s by batch size, eager and torch.compile"),
    ("decode", "JPEG decode: nvJPEG against Pillow"),
    ("server", "The real server against LitServe"),
    ("explain", "`/explain` on the device"),
    ("training", "Training: AMP images/s and one step's peak memory at 512 px"),
    ("bulk", "Bulk prediction (`python -m training predict`)"),
)


def _status_line(result: dict | None) -> list[str]:
    """'Not run: why' for a result that carries no figures."""
    if not result:
        return ["Not run in this invocation (see `--steps`).", ""]
    status = result.get("status")
    if status in ("skipped", "unavailable", "failed"):
        why = result.get("reason") or result.get("error") or ""
        return [f"**{status}**: {why}".rstrip(": "), ""]
    return []


def _table(head: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out + [""]


def tests(result: dict) -> list[str]:
    """The command and pytest's summary line."""
    return [f"`{result.get('command', 'pytest -m gpu')}` over {', '.join(result['files'])}: "
            f"**{result.get('summary') or result.get('note')}** (exit status "
            f"{result.get('exit_status')}, {result.get('seconds')} s).", ""]


def model(steps: dict) -> list[str]:
    """One row per arch x precision x mode; img/s per batch size."""
    rows = [*steps.get("model", {}).get("rows", []),
            *steps.get("compile", {}).get("rows", [])]
    sizes = sorted({int(b) for r in rows for b in r["images_per_s"]})
    out = _table(["arch", "precision", "mode", *[f"batch {b}" for b in sizes]],
                 [[r["arch"], r["precision"], r["mode"],
                   *[r["images_per_s"].get(b, r["images_per_s"].get(str(b))) for b in sizes]]
                  for r in rows])
    for r in rows:
        if r.get("first_call_s"):
            out.append(f"- {r['arch']} {r['precision']} {r['mode']}: first call (compile) "
                       + ", ".join(f"batch {b}: {s} s" for b, s in r["first_call_s"].items()))
    if "compile" not in steps:
        out.append("- torch.compile: not run in this invocation")
    return [*out, ""]


def decode(result: dict) -> list[str]:
    """img/s and CPU ms per image for each decoder and batch."""
    out = [f"{result['images']} real photos as JPEGs ({', '.join(result['sizes'])}), resize "
           f"{result['resize']}, crop {result['crop']}; fallbacks to the host: "
           f"{len(result['fallbacks'])}.", ""]
    return out + _table(["decoder", "batch", "img/s", "CPU ms per image"],
                        [[r["decoder"], r["batch"], r["images_per_s"], r["cpu_ms_per_image"]]
                         for r in result["rows"]])


def _gpu(level: dict) -> str:
    gpu = level.get("gpu") or {}
    if "util_mean_pct" not in gpu:
        return f"n/a ({gpu.get('unavailable', 'not sampled')})"
    return f"{gpu['util_mean_pct']}% / {gpu['util_max_pct']:.0f}%, {gpu['memory_max_mib']:.0f} MiB"


def _stages(level: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in level["cpu_ms_per_image_by_stage"].items()
                     if v >= 0.005)


def level_rows(name: str, part: dict, peer: dict[tuple[int, int], float]) -> list[list[object]]:
    """A server's levels as table rows, or one row saying why it has none."""
    if part.get("status") != "ok" or not part.get("levels"):
        why = part.get("reason") or part.get("error") or "no level fitted in its time box"
        return [[name, f"{part.get('status')}: {why}"] + [""] * 10]
    rows = []
    for lv in part["levels"]:
        other = peer.get((lv["images_per_request"], lv["concurrency"]))
        ratio = f"{lv['images_per_s'] / other:.2f}x" if other else ""
        rows.append([name, lv["images_per_request"], lv["concurrency"], lv["images_per_s"],
                     ratio, lv["p50_ms"], lv["p99_ms"], lv["errors"], lv["mean_batch"],
                     _gpu(lv), lv["server_cpu_ms_per_image"], _stages(lv)])
    return rows


HEAD = ["server", "img/req", "conc.", "img/s", "x LitServe", "p50 ms", "p99 ms", "errors",
        "mean batch", "GPU util mean / max, memory", "CPU ms/img", "CPU ms/img by stage"]


def server(result: dict) -> list[str]:
    """The service, LitServe and the stand-in, one row per level."""
    lit = result.get("litserve", {})
    peer = {(lv["images_per_request"], lv["concurrency"]): lv["images_per_s"]
            for lv in lit.get("levels", []) if not lv["errors"]}
    service, standin = result.get("service", {}), result.get("standin", {})
    out = [f"{result['arch']} with random weights; load generator: {result['loadgen']}; "
           f"the service with `--workers 0` ran {service.get('workers', '?')} worker(s). "
           f"Stand-in answer check: {standin.get('answer_check') or standin.get('status')}.",
           ""]
    rows = level_rows(f"service ({service.get('workers', '?')} workers)", service, peer)
    rows += level_rows(f"LitServe ({lit.get('api_servers', '?')} API servers x "
                       f"{lit.get('workers_per_device', '?')} workers)", lit, {})
    rows += level_rows("front end alone (stand-in model)", standin, {})
    return out + _table(HEAD, rows)


def explain(result: dict) -> list[str]:
    """POST /explain levels on the service."""
    return _table(HEAD, level_rows("service /explain", result, {}))


def training(result: dict, fit: dict | None) -> list[str]:
    """AMP rates, fit's rate, and peak memory against docs/training.md's rows."""
    out = _table(["arch", "image size", "batch", "precision", "img/s (bare loop)"],
                 [[r["arch"], r["image_size"], r["batch"], r["precision"], r["images_per_s"]]
                  for r in result["amp"]])
    if fit is None:
        out += ["`training fit`: not run in this invocation (see `--steps`).", ""]
    elif fit.get("status") == "ok":
        out += [f"`training fit` ({fit['arch']}, {fit['image_size']} px, batch "
                f"{fit['batch_size']}, {fit['precision']}): {fit['fit_images_per_s']} img/s "
                f"against {fit['bare_images_per_s']} for the bare loop ({fit['ratio']}x).", ""]
    else:
        out += [f"`training fit`: {fit.get('status')}: "
                f"{fit.get('reason') or fit.get('error')}", ""]
    out += _table(["arch", "AMP", "batch", "size", "precision", "peak GiB",
                   "smallest GPU it is recommended for", f"{1 - result['headroom']:.0%} of it",
                   "fits"],
                  [[r["arch"], r["amp"], r["batch"], r["image_size"], r.get("precision"),
                    "n/a (CUDA only)" if r.get("peak_gib") is None else r["peak_gib"],
                    f"{r['smallest_gpu_gib']} GiB", f"{r['budget_gib']} GiB",
                    r.get("error") or ("n/a" if r.get("fits") is None else r["fits"])]
                   for r in result["memory"]])
    return out


def bulk(result: dict) -> list[str]:
    """Images/s of one `training predict` run."""
    own = result.get("own_images_per_s")
    flags = " ".join(result["command"][8:])  # after: python -m training predict CKPT DIR -o F
    return [f"`python -m training predict CHECKPOINT FOLDER --output OUT.jsonl {flags}`: "
            f"{result['rows']} rows for "
            f"{result['images']} images ({result['errors']} errors) in {result['seconds']} s: "
            f"{result['images_per_s']} img/s with process start and model load; "
            f"**{own if own is not None else '?'} img/s** by its own count (the prediction "
            "loop alone).", ""]


RENDER = {"tests": tests, "decode": decode, "server": server, "explain": explain,
          "bulk": bulk}


def section(key: str, steps: dict) -> list[str]:
    """One section's lines: its figures, or why there are none."""
    result = steps.get(key)
    if key == "explain" and "server" in steps:  # measured on the server step's service
        result = steps["server"].get("explain") or steps["server"]
    if key == "model":
        return _status_line(steps.get("model")) + model(steps)
    lines = _status_line(result)
    if result is None or result.get("status") in ("skipped", "unavailable"):
        return lines
    try:
        if key == "training":
            return lines + training(result, steps.get("fit"))
        return lines + RENDER[key](result)
    except (KeyError, TypeError, ValueError):  # a failed step without all of its figures
        return lines


def markdown(report: dict) -> str:
    """The whole report."""
    env, steps = report["env"], report["steps"]
    lines = [f"## GPU run: {env['device']} ({env['date'][:10]})", ""]
    if report["dry_run"]:
        lines += ["**Dry run** (`--dry-run`, on the CPU where there is no CUDA): toy sizes, "
                  "one short pass of every step; no figure below is a measurement.", ""]
    driver = f"driver {env['driver']}" if env.get("driver") else "no NVIDIA driver"
    memory = f", {env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else ""
    lines += [f"`{report['command']}`: torch {env['torch']} (built for CUDA {env.get('cuda')})"
              f"{memory}, {driver}, {env.get('cpus')} CPUs; {report['elapsed_s']} s of a "
              f"{report['budget_s']:.0f} s budget.", ""]
    for key, title in SECTIONS:
        lines += [f"### {title}", "", *section(key, steps)]
    notes = [f"{name}: {r['status']} ({r.get('reason') or r.get('error')})"
             for name, r in steps.items() if r.get("status") in ("skipped", "failed")]
    notes += [n for r in steps.values() for n in r.get("notes", [])]
    lines += ["### Skipped, shortened to fit the time box, or failed", ""]
    lines += [f"- {n}" for n in notes] or ["Nothing."]
    return "\n".join(lines) + "\n"
