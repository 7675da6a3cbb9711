"""What the other shape of a multi-process front end would add per image: the hand-off.

    python -m bench.handoff --seconds 3

A front end split into ingest processes and one model process must send every decoded crop
(uint8 3x224x224, 147 KiB) to the model process and its probabilities back. This measures
that round trip between two real processes, per image, three ways: a multiprocessing queue
(pickled, as LitServe's API servers hand requests to its workers), shared-memory slots with
only the slot number on a pipe, and, as the baseline, the same copy within one process.
Batches of 1 and 8 crops per message (one or eight images per request).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import numpy as np

from bench.common import emit, environment

logger = logging.getLogger(__name__)

CROP = (3, 224, 224)
CLASSES = 1000
SLOTS = 64


def _queue_model(requests: multiprocessing.Queue, answers: multiprocessing.Queue) -> None:
    while (batch := requests.get()) is not None:
        answers.put(np.full((len(batch), CLASSES), 1.0 / CLASSES, dtype=np.float32))


def _shm_model(conn: Connection, name: str) -> None:
    memory = shared_memory.SharedMemory(name=name)
    crops = np.ndarray((SLOTS, *CROP), dtype=np.uint8, buffer=memory.buf)
    answer = np.full(CLASSES, 1.0 / CLASSES, dtype=np.float32)
    while (slots := conn.recv()) is not None:
        # a model would stack crops[slots] into its batch here, as a replica stacks its own
        conn.send_bytes(np.tile(answer, (len(slots), 1)).tobytes())
    del crops
    memory.close()


def per_image_us(run_one: object, batch: int, seconds: float) -> float:
    """Microseconds per image of `run_one(batch)` repeated for `seconds`."""
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        run_one(batch)  # type: ignore[operator]
        done += batch
    return (time.perf_counter() - began) / done * 1e6


def measure(batch: int, seconds: float) -> dict[str, float]:
    """The three hand-offs at `batch` crops per message."""
    context = multiprocessing.get_context("spawn")
    crops = [np.random.default_rng(i).integers(0, 255, CROP, dtype=np.uint8)
             for i in range(batch)]
    out: dict[str, float] = {}

    local = np.empty((SLOTS, *CROP), dtype=np.uint8)

    def in_process(n: int) -> None:
        for i in range(n):
            local[i] = crops[i]

    out["in_process_copy_us"] = per_image_us(in_process, batch, seconds)

    requests, answers = context.Queue(), context.Queue()
    worker = context.Process(target=_queue_model, args=(requests, answers))
    worker.start()

    def through_queue(n: int) -> None:
        requests.put(crops[:n])
        answers.get()

    through_queue(batch)
    out["queue_pickled_us"] = per_image_us(through_queue, batch, seconds)
    requests.put(None)
    worker.join(10)

    out["shared_memory_us"] = _shared_memory_us(context, crops, batch, seconds)
    return out


def _shared_memory_us(context: multiprocessing.context.BaseContext, crops: list[np.ndarray],
                      batch: int, seconds: float) -> float:
    memory = shared_memory.SharedMemory(create=True, size=SLOTS * int(np.prod(CROP)))
    views = [np.ndarray((SLOTS, *CROP), dtype=np.uint8, buffer=memory.buf)]
    ours, theirs = context.Pipe()
    worker = context.Process(target=_shm_model, args=(theirs, memory.name))
    worker.start()

    def through_shared_memory(n: int) -> None:
        for i in range(n):
            views[0][i] = crops[i]
        ours.send(list(range(n)))
        ours.recv_bytes()

    try:
        through_shared_memory(batch)
        return per_image_us(through_shared_memory, batch, seconds)
    finally:
        ours.send(None)
        worker.join(10)
        views.clear()  # no view may outlive the mapping
        memory.close()
        memory.unlink()


def main(argv: list[str] | None = None) -> dict:
    """Measure the hand-offs; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    results = {f"batch_{b}": measure(int(b), args.seconds) for b in args.batches.split(",")}
    report = {"bench": "handoff", "env": environment(), "crop": list(CROP),
              "results": results}
    emit(report)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1:])
