"""`predict` under torchrun: each rank classifies one contiguous slice of the images into a
part file of its own, and rank 0 appends the parts to the output in rank order, so the output
holds the rows in the order of the sources whatever the number of ranks.

A plan file beside the output (`OUTPUT.shards.json`) records where the slices start (the
output's complete rows when the run began), how many images there are, the number of ranks,
and the output's size at the start. A rerun after a crash or kill finds it, so each rank
continues its own part (run.py), and a merge cut short is redone from the recorded size. The
plan is removed once the parts are merged, then the parts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from training.commands.predict.rows import RowFile
from training.exceptions import OutputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    """Where each rank's slice of the images lies, and where the merge appends."""

    world_size: int
    start: int  # rows the output held when the sharded run began
    total: int  # images listed by the sources
    offset: int  # the output's size in bytes at `start`
    listing: str  # sha256 of the listed paths, so every rank lists the same images

    def bounds(self, rank: int) -> tuple[int, int]:
        """The [first, end) image indices of `rank`'s slice."""
        remaining = self.total - self.start
        return (self.start + remaining * rank // self.world_size,
                self.start + remaining * (rank + 1) // self.world_size)


def plan_path(output: Path) -> Path:
    """The plan file of a sharded run writing `output`."""
    return output.with_name(output.name + ".shards.json")


def part_path(output: Path, rank: int, world_size: int) -> Path:
    """The part file rank `rank` of `world_size` writes (same suffix, so the same format)."""
    return output.with_name(f"{output.stem}.part{rank}-of-{world_size}{output.suffix}")


def is_interrupted(output: Path) -> bool:
    """True when a sharded run writing `output` stopped before its merge finished."""
    return plan_path(output).is_file()


def make_plan(output: Path, planned: list[str], world_size: int, listing: str, *,
              all_scores: bool) -> ShardPlan:
    """The plan of this run (rank 0): an interrupted run's, else a new one from the
    output's complete rows (its torn end cut off). Parts of another number of ranks are
    removed, their rows done again."""
    path = plan_path(output)
    if path.is_file():
        try:
            old = ShardPlan(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise OutputError(f"{path}: not a plan of predict's ({exc}); delete it, and the "
                              "part files beside it, to start the sharding again") from exc
        if old.listing != listing or old.total != len(planned):
            raise OutputError(f"{path}: an interrupted run over other images ({old.total} "
                              f"then, {len(planned)} now); rerun it with the same sources, or "
                              "delete the plan and the part files beside it")
        if old.world_size == world_size:
            logger.info("continuing the interrupted run of %d ranks (%s)", world_size, path)
            return old
        logger.warning("the interrupted run had %d ranks, this one %d: its part files are "
                       "set aside and their rows done again", old.world_size, world_size)
        _remove_parts(output)
        plan = ShardPlan(world_size, old.start, old.total, old.offset, listing)
    else:
        _remove_parts(output)
        out = RowFile.open(output, all_scores=all_scores)
        try:
            check_prefix(out.kept.paths, planned, output)
            plan = ShardPlan(world_size, len(out.kept.paths), len(planned), out.kept.end,
                             listing)
        finally:
            out.close()
    _write_json(path, asdict(plan))
    return plan


def merge(output: Path, plan: ShardPlan, *, all_scores: bool) -> None:
    """Append every part to the output in rank order (rank 0, once all ranks finished),
    then remove the plan and the parts."""
    out = RowFile.open(output, all_scores=all_scores)
    try:
        out.truncate(plan.offset)  # rows a merge cut short appended are appended again
        for rank in range(plan.world_size):
            out.copy_rows_from(part_path(output, rank, plan.world_size), all_scores=all_scores)
    finally:
        out.close()
    plan_path(output).unlink()
    _remove_parts(output)


def check_prefix(kept: list[str], planned: list[str], output: Path) -> None:
    """Refuse an output whose rows are not the first of the images listed now."""
    if len(kept) > len(planned):
        raise OutputError(f"--output {output} holds {len(kept)} rows but the sources list "
                          f"{len(planned)} images: it belongs to other sources; choose another "
                          "--output, or delete it to start again")
    for i, (had, now) in enumerate(zip(kept, planned, strict=False)):
        if had != now:
            raise OutputError(f"--output {output}: row {i + 1} is {had!r} but the sources "
                              f"list {now!r} there: it belongs to other sources (or they "
                              "changed); choose another --output, or delete it to start again")


def _remove_parts(output: Path) -> None:
    pattern = f"{glob.escape(output.stem)}.part*-of-*{glob.escape(output.suffix)}"
    for part in output.parent.glob(pattern):
        part.unlink()


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
