"""The request-path benchmark's parts: the floor app, fixed crops, the stage split, the ratios."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter

import torch

from app.serving import imaging
from bench.floor_server import ANSWER, FloorApp
from bench.request_path import Server, summarise
from bench.stage_profile import KERNEL, SYSCALLS, main_thread_stages, split_ms, stage_of
from bench.standin_server import install_fixed_crop
from models.card import Preprocessing
from models.preprocessing import EvalCrop


def test_the_floor_reads_the_whole_body_and_answers_the_constant() -> None:
    messages = [{"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.request", "body": b"cd", "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(FloorApp()({"type": "http", "method": "POST", "path": "/predict"},
                           receive, send))
    assert not messages  # every chunk of the body was read
    assert sent[0]["status"] == 200 and sent[1]["body"] == ANSWER
    assert json.loads(ANSWER)["results"][0]["predictions"]


def test_fixed_crops_answer_the_cards_crop_size_for_every_upload() -> None:
    original = imaging.ImageDecoder.decode
    try:
        install_fixed_crop()
        install_fixed_crop()  # idempotent
        recipe = EvalCrop(Preprocessing(resize=40, crop=32))
        uploads = [imaging.Upload("a.jpg", b"not even an image"), imaging.Upload("b", b"")]
        decoded = asyncio.run(imaging.ImageDecoder.decode(None, uploads, recipe,  # type: ignore[arg-type]
                                                          timeout=1.0))
        assert [d.filename for d in decoded] == ["a.jpg", "b"]
        assert all(d.pixels.shape == (3, 32, 32) and d.pixels.dtype == torch.uint8
                   for d in decoded)
    finally:
        imaging.ImageDecoder.decode = original  # type: ignore[method-assign]


def test_a_sample_goes_to_the_stage_of_its_innermost_claimed_frame() -> None:
    route = "predict_images (app/api/routes/predict.py:50)"
    assert stage_of(["run (asyncio/events.py:80)", route,
                     "parse (python_multipart/multipart.py:1)", "f (contextlib.py:3)"]) \
        == "multipart"
    assert stage_of(["run (asyncio/events.py:80)", route, "gc_collect_main (libpython)"]) \
        == "garbage collector"
    assert stage_of(["x (somewhere.py:1)"]) == "other"


def test_only_the_main_threads_samples_are_counted_and_split() -> None:
    raw = ("thread (7): MainThread;a (h11/_connection.py:1) 30\n"
           "thread (7): MainThread;a (app/api/middleware.py:1) 10\n"
           "thread (7): MainThread;a (h11/_connection.py:1);send (libc.so.6) 50\n"
           "thread (8): decode_0;a (h11/_connection.py:1) 99\n")
    counts = main_thread_stages(raw, 7)
    assert counts == Counter({"HTTP (server, parser)": 30, "middleware": 10, SYSCALLS: 50})
    # the user time is split among the samples outside libc; the kernel time is its own stage
    assert split_ms(counts, 2.0, 0.25) == {"HTTP (server, parser)": 1.5, "middleware": 0.5,
                                           KERNEL: 0.25}


def _run(req_per_s: float, per_core: float, loop_ms: float) -> dict:
    return {"req_per_s": req_per_s, "req_per_core": per_core, "loop_ms_per_req": loop_ms,
            "server_cores": 1.0}


def test_ratios_pair_runs_of_the_same_round() -> None:
    args = argparse.Namespace(trees=["base", "new"], levels=["floor", "fixed"])
    servers = [Server("base", "floor", "", None, [_run(1000, 1000, 1), _run(900, 900, 1)]),  # type: ignore[arg-type]
               Server("base", "fixed", "", None, [_run(100, 200, 2), _run(90, 180, 2)]),  # type: ignore[arg-type]
               Server("new", "floor", "", None, [_run(1000, 1000, 1), _run(800, 800, 1)]),  # type: ignore[arg-type]
               Server("new", "fixed", "", None, [_run(200, 400, 1), _run(160, 400, 1)])]  # type: ignore[arg-type]
    ratios = summarise(servers, args)["ratios"]
    assert ratios["base: fixed/floor req_per_core"]["median"] == 0.2
    assert ratios["new: fixed/floor req_per_core"] == {"median": 0.45, "min": 0.4, "max": 0.5,
                                                       "n": 2}
    assert ratios["fixed: new/base req_per_s"]["min"] == 1.778
    assert ratios["fixed: base/new loop ms"]["median"] == 2.0
