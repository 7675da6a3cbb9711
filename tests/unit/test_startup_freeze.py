"""A server process freezes what start-up left alive; what it makes later is collected as before."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# run in a fresh interpreter: freezing is for the life of a process, and this one runs tests
SCRIPT = textwrap.dedent("""
    import gc, weakref
    from app.process.server import freeze_startup_objects

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    alive_at_start = cycle()  # garbage already: collected by the freeze's own collection
    kept = Node()
    freeze_startup_objects()
    assert alive_at_start() is None
    assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()  # the imports, frozen
    assert not any(o is kept for o in gc.get_objects())  # out of the collector's sight
    later = cycle()  # made after start-up: an ordinary cycle, found by a collection
    gc.collect()
    assert later() is None
    print("ok")
""")


def test_startup_objects_are_frozen_and_later_cycles_still_collected() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
