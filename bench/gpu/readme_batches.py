"""The recommended training batch sizes at 512 px, read from docs/training.md's table.

The table ("Batch size per GPU memory at 512 px") was computed from activations measured on a
CPU, not run on a GPU; the GPU command measures one training step at each batch it names and
checks it against the memory of the row that names it. Reading the page itself keeps the
two from drifting apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bench.gpu.context import ROOT

HEADER = "| GPU memory | resnet18, AMP"
_FIT_AT = re.compile(r"(\d+)(?: fit)? at (\d+)")


@dataclass(frozen=True)
class BatchClaim:
    """One cell's claim: `batch` images of `arch` fit one step on a `gpu_gib` GPU."""

    gpu_gib: int
    arch: str
    amp: bool
    batch: int
    accumulate: int = 1


def read_claims(readme: Path = ROOT / "docs" / "training.md") -> list[BatchClaim]:
    """Every claim of the table (ValueError when the page has no such table)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADER)), None)
    if start is None:
        raise ValueError(f"{readme} has no table starting {HEADER!r}")
    columns = [_column(cell) for cell in _cells(lines[start])[1:]]
    claims = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        gib = int(re.match(r"\d+", cells[0]).group())  # "12-16 GiB": the smaller one
        for (arch, amp), cell in zip(columns, cells[1:], strict=True):
            claims.extend(_cell_claims(gib, arch, amp, cell))
    return claims


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _column(cell: str) -> tuple[str, bool]:
    """'resnet50, AMP (default)' -> ('resnet50', True); 'resnet18 `--no-amp`' -> (.., False)."""
    return re.match(r"resnet\d+", cell).group(), "no-amp" not in cell


def _cell_claims(gib: int, arch: str, amp: bool, cell: str) -> list[BatchClaim]:
    """'16 x 4' -> 16 accumulated 4 times; '64 (128 fit at 40 GiB, 256 at 80)' -> three."""
    head, _, extra = cell.partition("(")
    batch, _, accumulate = head.partition("x")
    claims = [BatchClaim(gib, arch, amp, int(batch), int(accumulate or 1))]
    claims += [BatchClaim(int(at), arch, amp, int(n)) for n, at in _FIT_AT.findall(extra)]
    return claims
