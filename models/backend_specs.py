"""The runtimes a model can be served on, one entry each, without importing any of them.

Everything the rest of the code needs to know about a backend is its entry here: the
settings validate against the names, the runners (models.backends) are keyed by them, the
device and precision rules, the platform the Open Inference Protocol reports, whether the
runtime starts a thread pool of its own and where its runner is built all come from
`BACKEND_SPECS`. A new backend is one entry here naming its runner module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class BackendSpec:
    """One serving runtime's facts."""

    name: str
    platform: str  # the model metadata's `platform` (Open Inference Protocol)
    cpu_only: bool  # runs on the CPU whatever --device says
    fp32_only: bool  # refuses autocast precisions
    own_thread_pool: bool  # starts its worker pool on the thread that builds the runner
    summary: str  # one line for --help
    runner: str  # "module:function" building its runner (imported only when one is built)

    def conflicts(self, device: str, precision: str) -> str | None:
        """Why `device` and `precision` cannot be used with this backend (None: they can)."""
        if (self.cpu_only and device == "cuda") or (self.fp32_only
                                                    and precision in ("fp16", "bf16")):
            return (f"backend {self.name} runs {'fp32 ' if self.fp32_only else ''}"
                    f"{'on the CPU' if self.cpu_only else ''}; it cannot use device "
                    f"{device!r} with precision {precision!r}")
        return None


BACKEND_SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", platform="pytorch", cpu_only=False, fp32_only=False,
                own_thread_pool=False, summary="PyTorch on --device, autocast on CUDA",
                runner="models.backends:torch_runner"),
    BackendSpec("onnxruntime", platform="onnxruntime", cpu_only=True, fp32_only=True,
                own_thread_pool=True,
                summary="ONNX Runtime, CPU and fp32; exported at load and checked against "
                        "torch; needs the onnx extra",
                runner="models.onnx_backend:onnxruntime_runner"),
)}
BACKENDS: tuple[str, ...] = tuple(BACKEND_SPECS)
Backend = Literal[BACKENDS]  # type: ignore[valid-type]  # the names, for pydantic


def backend_spec(name: str) -> BackendSpec:
    """The entry of backend `name` (ValueError naming the known ones)."""
    try:
        return BACKEND_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}") from None


def backend_device(backend: str, device: str) -> str:
    """The device `backend` runs on, given the --device setting."""
    return "cpu" if backend_spec(backend).cpu_only else device
