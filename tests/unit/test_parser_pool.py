"""The parser processes: large bodies parse in another process and its errors come back as
they were raised; a parser that dies costs its one request; none outlives the server, whether
the server closes the pool or is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from app.api.v2_codec import InputContract, InputRule, parse_request
from app.exceptions import MalformedRequestError, ParserUnavailableError
from app.serving.parser_pool import ParserPool
from tests.server_process import ROOT

BIG = 1 << 20
CONTRACT = InputContract(inputs={"PIXELS": InputRule("UINT8", ((-1, 2, 2, 3),))},
                         outputs=("PROBABILITIES",), max_batch=4)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once no process `pid` runs (a zombie counts as gone)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


async def test_small_bodies_parse_here_large_ones_in_a_parser_process() -> None:
    pool = ParserPool(1, inline_below=1000)
    try:
        assert await pool.run(os.getpid, size=10) == os.getpid()
        parser = await pool.run(os.getpid, size=BIG)
        assert parser != os.getpid()
        body = json.dumps({"inputs": [{"name": "PIXELS", "datatype": "UINT8",
                                       "shape": [1, 2, 2, 3], "data": list(range(12))}]})
        parsed = await pool.run(parse_request, body.encode(), None, contract=CONTRACT,
                                size=BIG)
        assert parsed.inputs[0].data.tolist() == [[[[0, 1, 2], [3, 4, 5]],
                                                   [[6, 7, 8], [9, 10, 11]]]]
        with pytest.raises(MalformedRequestError, match="true/false"):
            await pool.run(parse_request, body.replace("0,", "true,", 1).encode(), None,
                           contract=CONTRACT, size=BIG)
    finally:
        pool.close()
    assert gone(parser)


async def test_a_parser_that_dies_costs_its_request_and_is_replaced() -> None:
    pool = ParserPool(1, inline_below=0)
    try:
        first = await pool.run(os.getpid, size=BIG)
        stuck = asyncio.create_task(pool.run(time.sleep, 30, size=BIG))
        await asyncio.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ParserUnavailableError):
            await asyncio.wait_for(stuck, 10)
        assert await pool.run(os.getpid, size=BIG) not in (first, os.getpid())
    finally:
        pool.close()
    with pytest.raises(ParserUnavailableError, match="shutting down"):
        await pool.run(os.getpid, size=BIG)


def test_parsers_leave_when_the_server_process_is_killed() -> None:
    script = textwrap.dedent("""
        import asyncio, os, time
        from app.serving.parser_pool import ParserPool

        async def main():
            pool = ParserPool(2, inline_below=0)
            pids = await asyncio.gather(*[pool.run(time.sleep, 0.3, size=1) for _ in "ab"],
                                        pool.run(os.getpid, size=1))
            print(pids[-1], flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    # stderr: its resource tracker reports the semaphores the killed process left behind
    server = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        parser = int(server.stdout.readline())
        assert not gone(parser, timeout=0.2)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert gone(parser), "a parser process outlived the killed server"
    finally:
        server.kill()
        server.wait()
