"""What the GPU command runs and for how long: full sizes on a GPU, tiny ones for --dry-run.

The whole run has one deadline (the 8 minutes a GPU window allows, less what set-up took).
Each step runs under a `Clock` that ends at its own cap or earlier, so that every later step
keeps its floor; inside a step, each part asks `Clock.allows(estimate)` first and is skipped,
with a note in the report, when it would not fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# the order they run in: torch.compile, then `training fit` (an extra), on what is left
STEPS = ("tests", "model", "decode", "server", "training", "bulk", "compile", "fit")

# seconds: (cap, floor) per step on a GPU; the floor is what earlier steps leave for it
GPU_STEP_SECONDS = {"tests": (45, 20), "model": (40, 20), "decode": (15, 8),
                    "server": (150, 90), "training": (40, 20), "bulk": (30, 0),
                    "compile": (10_000, 0), "fit": (10_000, 0)}
DRY_STEP_SECONDS = {name: (120, 0) for name in STEPS}
REPORT_RESERVE_S = 5.0  # kept back for writing the report and stopping servers


@dataclass(frozen=True)
class Clock:
    """A deadline on the monotonic clock."""

    deadline: float

    @classmethod
    def start(cls, seconds: float) -> Clock:
        """A clock that ends `seconds` from now."""
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        """Seconds until the deadline (negative once past)."""
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        """Whether something that takes about `seconds` still fits."""
        return self.left() >= seconds

    def within(self, seconds: float) -> Clock:
        """A clock ending `seconds` from now, or at this one's deadline if that is sooner."""
        return Clock(min(self.deadline, time.monotonic() + seconds))


@dataclass(frozen=True)
class Plan:
    """Every size the command uses; `full` for a GPU, `dry` for the CPU check."""

    dry_run: bool
    device: str
    archs: tuple[str, ...]
    precisions: tuple[str, ...] = ("bf16", "fp16")
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    model_seconds: float = 0.4  # per batch size, after one warm-up call
    compile_backend: str = "inductor"
    compile_estimate_s: float = 60.0  # until the first compile was timed
    crop: int = 224
    resize: int = 232
    classes: int = 1000
    server_arch: str = "resnet50"
    decode_images: int = 64
    decode_batches: tuple[int, ...] = (1, 8, 64)
    decode_seconds: float = 2.0
    levels: tuple[tuple[int, int], ...] = ((1, 64), (8, 16))  # (images per request, conc.)
    level_seconds: float = 5.0
    warmup_seconds: float = 1.0
    max_batch_size: int = 64
    explain_concurrency: int = 8
    start_timeout_s: float = 120.0
    train_arch: str = "resnet50"
    train_size: int = 224
    train_batch: int = 64
    train_steps: int = 15
    fit_args: tuple[str, ...] | None = ("--per-class", "150", "--epochs", "2")  # None: no fit
    memory_size: int = 512
    memory_batch_cap: int | None = None  # dry run: every batch shrunk to this
    bulk_images: int = 2048
    bulk_args: tuple[str, ...] = ()
    server_args: tuple[str, ...] = ()  # more flags for every server
    torch_threads: int = 0  # of the servers' processes (0: their defaults)
    step_seconds: dict[str, tuple[float, float]] = field(
        default_factory=lambda: dict(GPU_STEP_SECONDS))

    @classmethod
    def full(cls, device: str = "cuda") -> Plan:
        """The sizes for one H100/H200 within the 8-minute window."""
        return cls(dry_run=False, device=device, archs=("resnet50", "resnet34"))

    @classmethod
    def dry(cls, device: str = "cpu") -> Plan:
        """The same steps at toy sizes: seconds on a CPU, every code path once."""
        return cls(dry_run=True, device=device, archs=("resnet18",), batch_sizes=(1, 2),
                   model_seconds=0.0, compile_backend="eager", compile_estimate_s=5.0,
                   crop=32, resize=36, classes=10, server_arch="resnet18", decode_images=4,
                   decode_batches=(1, 2), decode_seconds=0.0, levels=((1, 2), (8, 1)),
                   level_seconds=1.0, warmup_seconds=0.0, max_batch_size=8,
                   explain_concurrency=1, start_timeout_s=60.0, train_arch="resnet18",
                   train_size=32, train_batch=4, train_steps=1,
                   fit_args=None,  # three interpreters and a real fit: 20 s of CPU
                   memory_size=32, memory_batch_cap=2, bulk_images=4,
                   bulk_args=("--workers", "1"), server_args=("--decode-workers", "1"),
                   torch_threads=1, step_seconds=dict(DRY_STEP_SECONDS))


def step_clock(run: Clock, plan: Plan, step: str, later: list[str]) -> Clock:
    """The clock of `step`: its cap, and never into the floors of the steps after it."""
    cap, _ = plan.step_seconds[step]
    floors = sum(plan.step_seconds[name][1] for name in later) + REPORT_RESERVE_S
    return Clock(min(run.deadline - floors, time.monotonic() + cap))
