"""The decode processes: fair across requests, inside each request's deadline, nothing run
for nobody, and what is stopped is killed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.exceptions import DeadlineExceededError, InvalidImageError
from app.serving.imaging import ImageDecoder, Upload
from tests.decode_gate import HEAVY, Gate
from tests.serving_helpers import png

pytestmark = pytest.mark.asyncio(loop_scope="function")

@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    opened = Gate(tmp_path)
    yield opened
    opened.release()


@pytest.fixture
def decoder() -> Iterator[ImageDecoder]:
    pool = ImageDecoder(workers=2, max_pixels=10**7)
    yield pool
    pool.close()


def heavy(n: int) -> list[Upload]:
    return [Upload(f"heavy{i}.png", png("red", seed=i, size=HEAVY)) for i in range(n)]


async def wait_for(condition, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        assert loop.time() < give_up, "condition not reached"
        await asyncio.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def warm_up(decoder: ImageDecoder, gate: Gate) -> None:
    """Every process has run the recipe once (its first run imports this module there)."""
    await wait_for(lambda: len(decoder.process_ids()) == decoder.workers)
    await asyncio.gather(*(decoder.decode([Upload("warm.png", png("green"))], gate.recipe,
                                          timeout=30) for _ in decoder.process_ids()))


async def test_a_request_of_heavy_images_cannot_starve_the_next_one(
        decoder: ImageDecoder, gate: Gate) -> None:
    big = asyncio.ensure_future(decoder.decode(heavy(4), gate.recipe, timeout=60))
    await wait_for(lambda: gate.heavy_started() >= 1)
    small = [Upload("small.png", png("blue"))]
    [image] = await asyncio.wait_for(decoder.decode(small, gate.recipe, timeout=30), 20)
    assert image.filename == "small.png" and image.pixels.shape == (3, 40, 48)
    assert not big.done() and gate.heavy_started() == decoder.share == 1
    gate.release()
    assert len(await big) == 4


async def test_a_lone_request_uses_its_share_of_processes(gate: Gate) -> None:
    pool = ImageDecoder(workers=3, max_pixels=10**7)
    try:
        work = asyncio.ensure_future(pool.decode(heavy(5), gate.recipe, timeout=60))
        await wait_for(lambda: gate.heavy_started() == 2)
        await asyncio.sleep(0.2)
        assert gate.heavy_started() == 2 == pool.share  # one process stays free for newcomers
        gate.release()
        assert len(await work) == 5
    finally:
        pool.close()


async def test_the_deadline_kills_the_running_decode_and_unstarted_images_never_run(
        decoder: ImageDecoder, gate: Gate) -> None:
    loop = asyncio.get_running_loop()
    await warm_up(decoder, gate)
    before = set(decoder.process_ids())
    began = loop.time()
    with pytest.raises(DeadlineExceededError, match="decoding 4 image"):
        await decoder.decode(heavy(4), gate.recipe, timeout=2.0)
    assert loop.time() - began < 5  # answered at its deadline, not when decoding ends
    assert gate.heavy_started() == 1  # the other three were dropped, never decoded
    # the process holding the heavy image was killed and replaced: nothing keeps running
    await wait_for(lambda: not all(alive(pid) for pid in before))
    await wait_for(lambda: len(set(decoder.process_ids()) - before) == 1)
    small = [Upload("small.png", png("green"))]
    assert len(await decoder.decode(small, gate.recipe, timeout=30)) == 1


async def test_after_a_bad_file_the_rest_is_not_decoded_and_running_decodes_stop(
        gate: Gate) -> None:
    pool = ImageDecoder(workers=3, max_pixels=10**7)  # a share of two: heavy0 beside broken
    try:
        await warm_up(pool, gate)
        before = set(pool.process_ids())
        uploads = [Upload("broken.png", b"not an image"), *heavy(4)]
        with pytest.raises(InvalidImageError, match="broken.png"):
            await pool.decode(uploads, gate.recipe, timeout=60)
        await asyncio.sleep(0.3)
        assert gate.heavy_started() <= 1  # at most the one started beside the bad file
        if gate.heavy_started() == 1:  # and that one was stopped: its process killed
            await wait_for(lambda: not all(alive(pid) for pid in before))
        await wait_for(lambda: len(pool.process_ids()) == pool.workers)
        idle = pool.process_ids()
        spent = {pid: cpu_seconds(pid) for pid in idle}
        await asyncio.sleep(0.5)
        assert all(cpu_seconds(pid) - spent[pid] < 0.1 for pid in idle)
    finally:
        pool.close()


async def test_a_bad_file_stops_what_follows_it_while_earlier_ones_finish(gate: Gate) -> None:
    """heavy0 is still decoding when broken.png fails: the answer waits for heavy0 (an
    earlier bad file would be the one to report), but heavy1.. are stopped or never run."""
    pool = ImageDecoder(workers=3, max_pixels=10**7)
    try:
        await warm_up(pool, gate)
        uploads = [*heavy(1), Upload("broken.png", b"not an image"), *heavy(3)]
        answer = asyncio.ensure_future(pool.decode(uploads, gate.recipe, timeout=60))
        await wait_for(lambda: gate.heavy_started() >= 1)
        await asyncio.sleep(0.5)  # broken.png has failed beside it by now
        assert not answer.done() and gate.heavy_started() == 1
        gate.release()
        with pytest.raises(InvalidImageError, match="broken.png"):
            await answer
        assert gate.heavy_started() == 1
    finally:
        pool.close()


async def test_first_bad_file_in_upload_order_is_the_one_reported(
        decoder: ImageDecoder, gate: Gate) -> None:
    gate.release()
    uploads = [*heavy(1), Upload("first-bad.png", b"x"), Upload("second-bad.png", b"y")]
    with pytest.raises(InvalidImageError, match="first-bad.png"):
        await decoder.decode(uploads, gate.recipe, timeout=30)
