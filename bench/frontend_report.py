"""The front-end benchmark's ratios and its Markdown table (bench.frontend, bench.report)."""

from __future__ import annotations

Key = tuple[int, int]  # (concurrency, images per request)


def _key(level: dict) -> Key:
    return level["concurrency"], level["images_per_request"]


def _litserve_name(run: dict) -> str:
    return f"litserve a={run['api_servers']} w={run['workers_per_device']}"


def best_litserve(runs: list[dict]) -> dict[Key, dict]:
    """At each level, the LitServe configuration with the most images/s and no errors."""
    best: dict[Key, dict] = {}
    for run in runs:
        for level in run.get("levels", []):
            if level["errors"] or not level["images_per_s"]:
                continue
            key = _key(level)
            if key not in best or level["images_per_s"] > best[key]["images_per_s"]:
                best[key] = {"config": _litserve_name(run), "api_servers": run["api_servers"],
                             "workers_per_device": run["workers_per_device"],
                             "images_per_s": level["images_per_s"]}
    return best


def summarise(result: dict) -> dict:
    """Add to a raw result: the mean one-core rate, cores x it, each level's ratios to it and
    to the best LitServe, and the headline (1 image per request, c=64 or the highest c)."""
    raw = result["raw_decode_resize_one_core"]
    raw["mean"] = round((raw["before"] + raw["after"]) / 2, 1)
    ceiling = result["cores"] * raw["mean"]
    result["cores_x_raw_images_per_s"] = round(ceiling, 1)
    best = best_litserve(result["litserve"])
    for run in result["service"] + result["litserve"]:
        for level in run.get("levels", []):
            level["x_cores_raw"] = round(level["images_per_s"] / ceiling, 3) if ceiling else None
    for run in result["service"]:
        for level in run.get("levels", []):
            top = best.get(_key(level))
            level["x_best_litserve"] = (round(level["images_per_s"] / top["images_per_s"], 2)
                                        if top else None)
    result["best_litserve"] = [{"concurrency": c, "images_per_request": i, **v}
                               for (c, i), v in sorted(best.items())]
    result["headline"] = _headline(result, best)
    return result


def _headline(result: dict, best: dict[Key, dict]) -> dict:
    levels = [lv for run in result["service"] + result["litserve"]
              for lv in run.get("levels", [])]
    concurrencies = {lv["concurrency"] for lv in levels}
    if not concurrencies:
        return {}
    key = (64 if 64 in concurrencies else max(concurrencies), 1)
    service = {}
    for run in result["service"]:
        level = next((lv for lv in run.get("levels", []) if _key(lv) == key), None)
        if level is not None:
            service[f"workers={run['workers']}"] = {
                k: level[k] for k in ("images_per_s", "errors", "x_best_litserve", "x_cores_raw")}
    return {"concurrency": key[0], "images_per_request": key[1],
            "best_litserve": best.get(key), "service": service}


def _cpu(level: dict, *, service: bool) -> str:
    roles = level.get("server_cpu_ms_per_image_by_role", {})
    threads = level.get("server_cpu_ms_per_image_by_thread", {})
    parts = [", ".join(f"{k} {v:.2f}" for k, v in d.items() if v >= 0.005)
             for d in (roles, threads)]
    loop = level.get("event_loop_ms_per_request")
    if loop is not None and service:  # LitServe decodes in its processes' main threads
        parts.insert(0, f"event loop {loop:.2f} ms/req")
    return f"{level['server_cpu_ms_per_image']:.2f} ({'; '.join(p for p in parts if p)})"


def _rows(name: str, run: dict) -> list[str]:
    if "skipped" in run or ("error" in run and not run.get("levels")):
        return [f"| {name} | {run.get('skipped') or 'failed: ' + run['error']} |"]
    rows = []
    for lv in run["levels"]:
        ratio = lv.get("x_best_litserve")
        rows.append(
            f"| {name} | {lv['concurrency']} | {lv['images_per_request']} | "
            f"{lv['images_per_s']:.1f} | {lv['x_cores_raw']:.2f}x | "
            f"{f'{ratio:.2f}x' if ratio is not None else ''} | {lv['p50_ms']:.0f} | "
            f"{lv['p99_ms']:.0f} | {lv['errors']} | "
            f"{lv['mean_batch'] if lv['mean_batch'] is not None else '-'} | "
            f"{lv['loadgen_cpu_pct']:.0f}% | {_cpu(lv, service=name.startswith('service'))} |")
    if "error" in run:
        rows.append(f"| {name} | failed after these levels: {run['error']} |")
    return rows


def table(result: dict) -> str:
    """Markdown: the one-core rate, the headline ratio, one row per level."""
    raw = result["raw_decode_resize_one_core"]
    head = result.get("headline") or {}
    lines = [
        f"Front end, stand-in model ({result['arch']} card, resize {result['resize']}, crop "
        f"{result['crop']}), {result['cores']} cores, wrk {result['loadgen']['threads']} "
        f"thread(s), {result['seconds_per_level']:g} s per level, torch threads per server "
        f"process {result.get('torch_threads') or 'default'}.",
        f"Decode + resize on one core: {raw['mean']} img/s (before {raw['before']}, after "
        f"{raw['after']}); cores x that: {result['cores_x_raw_images_per_s']} img/s.",
    ]
    if head.get("service"):
        top = head["best_litserve"]
        lines.append(
            f"At c={head['concurrency']}, {head['images_per_request']} image per request: "
            + ", ".join(f"service {w} {v['images_per_s']:.1f} img/s "
                        f"({v['x_best_litserve']}x best LitServe)"
                        for w, v in head["service"].items())
            + (f"; best LitServe {top['config']} {top['images_per_s']:.1f} img/s" if top
               else "; no error-free LitServe level"))
    lines += [
        "",
        "| server | conc. | img/req | img/s | x cores*raw | x best LitServe | p50 ms | p99 ms "
        "| errors | mean batch | loadgen CPU | server CPU ms/img (by role; by thread) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["service"]:
        lines += _rows(f"service w={run['workers']}", run)
    for run in result["litserve"]:
        lines += _rows(_litserve_name(run), run)
    return "\n".join(lines)
