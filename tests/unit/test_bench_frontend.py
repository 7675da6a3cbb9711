"""The front-end benchmark's pure parts: request bodies, wrk's totals, CPU by role, ratios."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

import models.predict
from bench.frontend_report import best_litserve, summarise, table
from bench.servertree import cpu_by_role
from bench.standin_server import FixedProbabilities, install_standin, standin_runner
from bench.wrk import (
    RESULT_TAG,
    content_type,
    multipart_body,
    parse_output,
    request_bodies,
    write_script,
)
from models.card import ModelCard
from models.outputs import check_probabilities, probabilities


def _parse_form(body: bytes) -> list[tuple[str | None, bytes]]:
    """The files of field `file`, parsed the way the service's framework parses uploads."""

    async def parse() -> list[tuple[str | None, bytes]]:
        async def stream() -> AsyncIterator[bytes]:
            yield body

        form = await MultiPartParser(Headers({"content-type": content_type()}), stream()).parse()
        return [(f.filename, await f.read()) for f in form.getlist("file")]

    return asyncio.run(parse())


def test_multipart_body_round_trips_binary_files() -> None:
    files = [("a.jpg", b"\xff\xd8\r\n--not-a-boundary\r\n\x00" * 50), ("b.jpg", b"\r\n"),
             ("c.jpg", bytes(range(256)))]
    assert _parse_form(multipart_body(files)) == files


def test_multipart_body_refuses_a_boundary_inside_a_file() -> None:
    with pytest.raises(ValueError, match="boundary"):
        multipart_body([("x.jpg", b"abc")], boundary="b")


def test_request_bodies_rotate_through_the_photos() -> None:
    jpegs = [b"one", b"two", b"three"]
    bodies = request_bodies(jpegs, 2)
    assert len(bodies) == 3
    assert [data for _, data in _parse_form(bodies[2])] == [b"three", b"one"]


def test_write_script_names_every_body(tmp_path: Path) -> None:
    script = write_script(tmp_path, [b"x", b"yy"], path="/predict")
    text = script.read_text()
    for name in ("body-000.bin", "body-001.bin"):
        assert str((tmp_path / name).resolve()) in text
    assert (tmp_path / "body-001.bin").read_bytes() == b"yy"
    assert content_type() in text and RESULT_TAG.strip() in text


WRK_STDOUT = """Running 3s test @ http://127.0.0.1:8392/predict
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    97.54ms   45.10ms 415.81ms   80.00%
  445 requests in 3.02s, 221.20KB read
  Non-2xx or 3xx responses: 5
Requests/sec:    147.59
WRK_RESULT {"requests": 445, "duration_us": 3015198, "bytes": 226505, "connect": 0, \
"read": 1, "write": 0, "status": 5, "timeout": 2, "p50_us": 89183, "p99_us": 397308, \
"max_us": 415814}
"""


def test_parse_output_reads_the_totals_and_counts_every_error() -> None:
    result = parse_output(WRK_STDOUT)
    assert result.requests == 445 and result.ok == 440
    assert result.http_errors == 5 and result.socket_errors == 3 and result.errors == 8
    assert result.seconds == pytest.approx(3.015198)
    assert result.p50_ms == pytest.approx(89.183) and result.max_ms == pytest.approx(415.814)


def test_parse_output_without_the_totals_line_fails() -> None:
    with pytest.raises(ValueError, match="WRK_RESULT"):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_cpu_by_role_splits_supervisor_and_workers() -> None:
    before = {"10/10": ("main", 1.0), "11/11": ("main", 2.0), "11/12": ("decode", 0.5)}
    after = {"10/10": ("main", 1.5), "11/11": ("main", 3.0), "11/12": ("decode", 2.5),
             "12/12": ("main", 0.25)}  # a worker that started in between counts from zero
    assert cpu_by_role(before, after, 10) == {"supervisor": 0.5, "worker": 3.25}
    assert cpu_by_role({"10/10": ("main", 1.0)}, {"10/10": ("main", 4.0)}, 10) == {
        "server": 3.0}


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_stand_in_answers_fixed_logits_that_score_as_its_row(task: str) -> None:
    """A runner answers logits (the Predictor makes the scores, as for a real model)."""
    card = ModelCard(name="m", arch="resnet34", task=task, classes=["a", "b", "c"])
    runner = standin_runner("torch", torch.nn.Identity(), card, None)  # type: ignore[arg-type]
    out = runner(torch.zeros((4, 3, 8, 8), dtype=torch.uint8))
    scores = probabilities(out, task)
    check_probabilities(scores, rows=4, classes=3, task=task)
    assert torch.equal(out[0], out[3])
    assert torch.allclose(scores[:1], FixedProbabilities(card).row)


def test_install_standin_replaces_the_predictors_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.predict, "make_runner", models.predict.make_runner)
    install_standin()
    install_standin()
    assert models.predict.make_runner is standin_runner


def _level(c: int, images: int, rate: float, errors: int = 0) -> dict:
    return {"concurrency": c, "images_per_request": images, "images_per_s": rate,
            "errors": errors, "p50_ms": 1.0, "p99_ms": 2.0, "mean_batch": None,
            "loadgen_cpu_pct": 1.0, "server_cpu_ms_per_image": 3.0,
            "server_cpu_ms_per_image_by_role": {"server": 3.0},
            "server_cpu_ms_per_image_by_thread": {"main": 2.0, "decode": 1.0}}


def _result() -> dict:
    return {
        "arch": "resnet50", "resize": 232, "crop": 224, "cores": 2, "seconds_per_level": 2,
        "loadgen": {"threads": 1}, "raw_decode_resize_one_core": {"before": 90.0, "after": 110.0},
        "service": [{"workers": 1, "levels": [_level(16, 1, 50.0), _level(64, 1, 80.0)]},
                    {"workers": 2, "skipped": "no --workers"}],
        "litserve": [
            {"api_servers": 1, "workers_per_device": 1,
             "levels": [_level(16, 1, 40.0), _level(64, 1, 90.0, errors=3)]},
            {"api_servers": 2, "workers_per_device": 1,
             "levels": [_level(16, 1, 20.0), _level(64, 1, 40.0)]},
            {"api_servers": 2, "workers_per_device": 2, "error": "server exited", "levels": []},
        ],
    }


def test_best_litserve_ignores_levels_with_errors() -> None:
    best = best_litserve(_result()["litserve"])
    assert best[(16, 1)]["config"] == "litserve a=1 w=1"
    assert best[(64, 1)] == {"config": "litserve a=2 w=1", "api_servers": 2,
                             "workers_per_device": 1, "images_per_s": 40.0}


def test_summarise_computes_the_ratios_and_the_headline() -> None:
    result = summarise(_result())
    assert result["cores_x_raw_images_per_s"] == 200.0
    levels = result["service"][0]["levels"]
    assert levels[1]["x_cores_raw"] == 0.4 and levels[1]["x_best_litserve"] == 2.0
    head = result["headline"]
    assert (head["concurrency"], head["images_per_request"]) == (64, 1)
    assert head["service"]["workers=1"]["x_best_litserve"] == 2.0
    text = table(result)
    assert "no --workers" in text and "failed: server exited" in text
    assert text.count("| service w=1 |") == 2


def test_the_event_loop_is_the_main_thread_of_every_process_but_the_decoders() -> None:
    from bench.frontend import event_loop_seconds

    me = os.getpid()
    snapshot = {f"{me}/{me}": ("main", 1.5), f"{me}/{me + 1}": ("compute", 2.0),
                "999999999/999999999": ("main", 4.0)}  # a process that is gone: not counted
    assert event_loop_seconds(snapshot) == 1.5
