"""DistributedDataParallel plumbing: process groups, who writes, and unpadded gathering."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that logs progress and writes files."""
        return self.rank == 0


def dist_info_from_env(env: dict[str, str]) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (the one place they are read)."""
    return DistInfo(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                    local_rank=int(env.get("LOCAL_RANK", 0)))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA tensors on GPUs, gloo for CPU tensors always
    (the epoch's mean loss, the warm-up's error and gathered objects are CPU values, which
    NCCL alone cannot reduce)."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            device_id=device if device.type == "cuda" else None)
    logger.info("joined process group: rank %d of %d (%s)", info.rank, info.world_size, backend)


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when alone)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] when alone)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(info: DistInfo, value: float, weight: float) -> float:
    """The weighted mean of `value` across ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value * weight, weight], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else 0.0
