"""bench.train_memory: saved-for-backward bytes grow linearly with the batch, autocast's weight
copies are the only batch-independent part, and the batch sizing keeps its headroom."""

from __future__ import annotations

import pytest

from bench.train_memory import GIB, MIB, MemoryRow, markdown, measure


@pytest.fixture(scope="module")
def rows() -> dict[str, MemoryRow]:
    """resnet18 at 64 px in both precisions (small enough to measure in a second)."""
    return {precision: measure("resnet18", 64, precision) for precision in ("fp32", "bf16")}


def test_saved_bytes_are_linear_in_the_batch(rows) -> None:
    for row in rows.values():
        assert row.saved[1] < row.saved[2] < row.saved[4]
        assert row.linearity_error < 1e-3


def test_only_autocast_keeps_bytes_whatever_the_batch(rows) -> None:
    fp32, bf16 = rows["fp32"], rows["bf16"]
    assert abs(fp32.batch_independent) < MIB  # the targets and the loss, nothing more
    # the bf16 copies of the weights: 2 bytes a parameter (the few fp32 norm weights aside)
    assert 1.5 * bf16.params < bf16.batch_independent < 2.2 * bf16.params
    assert 0.45 * fp32.per_image < bf16.per_image < 0.6 * fp32.per_image
    assert fp32.fixed == pytest.approx(16 * fp32.params, rel=0.01)


def test_the_largest_batch_keeps_the_headroom() -> None:
    row = MemoryRow("resnet18", 512, "bf16", params=GIB // 16, saved={1: 2 * GIB, 4: 5 * GIB})
    assert row.per_image == GIB and row.batch_independent == GIB and row.fixed == 2 * GIB
    # 16 GiB x 0.75 = 12 GiB: 2 GiB fixed leaves 10, so 8 images fit and 16 do not
    assert row.largest_batch(16) == 8
    assert row.largest_batch(16, headroom=0.0) == 8  # 14 GiB: still not 16 images
    assert row.largest_batch(2) == 0  # not even one image
    assert "| resnet18 | 512 | bf16 | 1024.0 |" in markdown([row])
