"""The tables worker processes share: queue room, readiness, reload requests."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from app.exceptions import QueueFullError
from app.process.shared_tables import (
    HEARTBEAT_NS,
    PID,
    READY,
    RELOADED,
    STATE,
    STOPPING,
    ClusterTables,
    SharedState,
    queue_slot,
    ready_heartbeat_limit,
)
from app.process.sizing import workers_for
from app.process.worker_link import WorkerLink
from app.serving.batching import DynamicBatcher

SPAWN = multiprocessing.get_context("spawn")


def _tables(workers: int = 2) -> ClusterTables:
    return ClusterTables.create(workers, SPAWN)


def test_one_model_shares_its_room_across_workers() -> None:
    tables = _tables()
    first, second = WorkerLink(tables, 0), WorkerLink(tables, 1)
    bound0, bound1 = first.queue_bound("pets", 10), second.queue_bound("pets", 10)
    assert bound0.try_add(7)
    assert not bound1.try_add(4)  # 7 + 4 > 10: refused, and nothing counted
    assert bound1.held() == 7
    assert bound1.try_add(3)
    assert bound0.held() == bound1.held() == 10
    bound0.remove(7)
    assert bound1.try_add(7)


def test_models_have_rooms_of_their_own() -> None:
    tables = _tables()
    link = WorkerLink(tables, 0)
    names = ["pets", "cars"]
    assert queue_slot(names[0]) != queue_slot(names[1])
    pets, cars = (link.queue_bound(name, 4) for name in names)
    assert pets.try_add(4)
    assert cars.try_add(4)
    assert not pets.try_add(1)


def test_a_dead_workers_room_is_given_back() -> None:
    tables = _tables()
    bound = WorkerLink(tables, 1).queue_bound("pets", 5)
    assert bound.try_add(5)
    other = WorkerLink(tables, 0).queue_bound("pets", 5)
    assert not other.try_add(1)
    SharedState(tables).clear(1)  # what the supervisor does when worker 1 exits
    assert other.try_add(5)


def _hold_room(tables: ClusterTables, count: int, held, release) -> None:
    bound = WorkerLink(tables, 1).queue_bound("pets", 8)
    assert bound.try_add(count)
    held.set()
    release.wait(30)
    bound.remove(count)


def test_room_is_shared_between_processes() -> None:
    tables = _tables()
    held, release = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_hold_room, args=(tables, 6, held, release))
    child.start()
    try:
        assert held.wait(60), "the other process never took its room"
        bound = WorkerLink(tables, 0).queue_bound("pets", 8)
        assert bound.held() == 6
        assert not bound.try_add(3)
        assert bound.try_add(2)
        bound.remove(2)
        release.set()
        child.join(30)
        assert child.exitcode == 0
        assert bound.try_add(8)
    finally:
        release.set()
        child.join(5)
        if child.is_alive():
            child.kill()


async def test_batchers_in_two_workers_refuse_past_the_shared_bound() -> None:
    tables = _tables()
    batchers = [DynamicBatcher(lambda items: items, max_batch_size=4, max_wait_ms=1,
                               max_queue=8, name="pets",
                               bound=WorkerLink(tables, i).queue_bound("pets", 8))
                for i in range(2)]
    with batchers[0].reserve(6):
        with (pytest.raises(QueueFullError, match="6 of 8 queue slots taken, 3 more"),
              batchers[1].reserve(3)):
            pass
        with batchers[1].reserve(2):
            pass
    with batchers[1].reserve(8):  # the room came back when the reservations ended
        pass


async def test_queued_images_count_until_they_run() -> None:
    tables = _tables()
    batchers = [DynamicBatcher(lambda items: [x * 2 for x in items], max_batch_size=4,
                               max_wait_ms=1, max_queue=8, name="pets",
                               bound=WorkerLink(tables, i).queue_bound("pets", 8))
                for i in range(2)]
    batchers[0].start()
    try:
        assert await batchers[0].submit(list(range(8)), timeout=5) == [x * 2 for x in range(8)]
        with batchers[1].reserve(8):  # every image ran, so all the room is free again
            pass
    finally:
        await batchers[0].stop(5)


def test_readiness_counts_only_live_ready_workers() -> None:
    tables = _tables(3)
    state = SharedState(tables)
    links = [WorkerLink(tables, i) for i in range(3)]
    assert state.ready_count() == 0
    for link in links:
        link._row[STATE] = READY
    assert state.ready_count() == 0  # none has ticked yet
    for link in links:
        link._row[HEARTBEAT_NS] = time.monotonic_ns()
    assert links[0].all_ready()
    links[2]._row[STATE] = STOPPING
    assert not links[0].all_ready()
    assert links[0].ready_count() == 2
    state.clear(1)
    assert state.ready_count() == 1
    assert state.pid(0) == os.getpid() and state.rows[1, PID] == 0


def test_a_worker_that_stops_ticking_is_not_ready_long_before_it_is_replaced() -> None:
    tables = ClusterTables.create(2, SPAWN, worker_timeout=30.0)
    assert tables.stale_after == 3.0  # a few seconds, well under the worker timeout
    assert ready_heartbeat_limit(3.0) == 1.0
    links = [WorkerLink(tables, i) for i in range(2)]
    for link in links:
        link._row[STATE] = READY
        link._row[HEARTBEAT_NS] = time.monotonic_ns()
    assert links[0].all_ready()
    links[1]._row[HEARTBEAT_NS] = time.monotonic_ns() - int(3.5e9)  # stopped 3.5 s ago
    assert not links[0].all_ready()
    assert links[0].ready_count() == 1


def test_reload_requests_add_up_from_every_requester() -> None:
    tables = _tables(2)
    state = SharedState(tables)
    assert state.reload_target() == 0
    assert state.request_reload(0) == 1
    assert state.request_reload(2) == 2  # the supervisor's row (SIGHUP)
    assert state.request_reload(1) == 3
    assert state.rows[0, RELOADED] == 0


@pytest.mark.parametrize(("requested", "on_cuda", "cpus", "expected"), [
    (3, False, 2, 3), (0, False, 64, 1), (0, True, 2, 1), (0, True, 16, 4), (0, True, 128, 16),
])
def test_automatic_worker_count(requested: int, on_cuda: bool, cpus: int,
                                expected: int) -> None:
    assert workers_for(requested, on_cuda=on_cuda, cpus=cpus) == expected


def test_torch_threads_follow_the_device_and_the_workers() -> None:
    import torch

    from app.main import host_threads
    from models.device import Accelerator

    cpu, cuda = Accelerator(torch.device("cpu")), Accelerator(torch.device("cuda"))
    assert host_threads(3, cpu, processes=2) == 3  # asked for: as asked
    assert host_threads(3, cuda) == 3
    assert host_threads(0, cuda, processes=4) == 1
    cores = torch.get_num_threads()
    assert host_threads(0, cpu) == cores
    assert host_threads(0, cpu, processes=cores * 2) == 1
