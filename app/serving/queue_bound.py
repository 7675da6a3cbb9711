"""The room a model's queue has: counted in this process, or across the workers (a bound of
the same shape over shared tables, app.process.shared_tables.SharedQueueBound)."""

from __future__ import annotations

from typing import Protocol


class QueueBound(Protocol):
    """Room for at most `max_queue` images."""

    max_queue: int

    def try_add(self, count: int) -> bool:
        """Count `count` more images if they fit; False (nothing counted) if not."""
        ...

    def remove(self, count: int) -> None:
        """`count` images have left the queue (run, dropped or failed)."""
        ...

    def held(self) -> int:
        """Images counted against the bound now."""
        ...


class LocalQueueBound:
    """Room for at most `max_queue` images, counted in this process only."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._held = 0

    def try_add(self, count: int) -> bool:
        """Count `count` more images if they fit; False (nothing counted) if not."""
        if self._held + count > self.max_queue:
            return False
        self._held += count
        return True

    def remove(self, count: int) -> None:
        """`count` images have left the queue (run, dropped or failed)."""
        self._held -= count

    def held(self) -> int:
        """Images counted against the bound now."""
        return self._held
