"""One device abstraction: where tensors live, which precision runs, how batches get there.

Everything CUDA-specific (autocast dtype, pinned host memory, non-blocking copies) lives here
so the rest of the code asks a `Accelerator` and never branches on the device itself.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda[:N]` into a torch.device, failing clearly if CUDA is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "check the NVIDIA driver and that the container runs with --gpus, "
                "or pass --device cpu"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceUnavailableError(f"unknown device {name!r}; choose one of {DEVICE_CHOICES}")


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype to use, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISION_CHOICES}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # on the CPU, fp32 unless asked: bf16 changes the outputs


@dataclass(frozen=True)
class Accelerator:
    """Where and how a model runs."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = True

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto", *,
               channels_last: bool = True) -> Accelerator:
        """Resolve device and precision names into a Accelerator."""
        dev = resolve_device(device)
        return cls(device=dev, amp_dtype=resolve_precision(dev, precision),
                   channels_last=channels_last)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def decodes_jpeg(self, setting: str = "auto") -> bool:
        """Whether uploads' JPEGs are decoded on this device: `auto` on CUDA (nvJPEG) only,
        `on` on whatever device this is, `off` never."""
        if setting not in ("auto", "on", "off"):
            raise ValueError(f"unknown device decode setting {setting!r}; choose auto, on, off")
        return setting == "on" or (setting == "auto" and self.is_cuda)

    @property
    def precision_name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the configured dtype, or a no-op for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the device in the memory format that runs fastest there."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Copy a host batch to the device (pinned, non-blocking on CUDA)."""
        if self.is_cuda:
            if not batch.is_pinned():
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        """A human-readable device name for logs and cards."""
        if self.is_cuda:
            return f"{torch.cuda.get_device_name(self.device)} ({self.device})"
        return f"cpu ({torch.get_num_threads()} threads)"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA's can be retried on a smaller batch)."""
    message = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in message \
        or (isinstance(exc, RuntimeError) and "not enough memory" in message)


def release_cuda_cache() -> None:
    """Return cached CUDA blocks to the driver (used after an out-of-memory error)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
