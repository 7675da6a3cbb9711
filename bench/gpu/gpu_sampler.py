"""GPU utilisation and memory sampled while a load level runs: NVML, else nvidia-smi.

NVML comes from the nvidia-ml-py package (module `pynvml`); without it, `nvidia-smi -lms`
streams the same two figures. Without either (no NVIDIA driver, as on a CPU host) the
sampler says so and measures nothing.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from types import TracebackType

logger = logging.getLogger(__name__)

QUERY = "utilization.gpu,memory.used"


class GpuSampler:
    """`with GpuSampler() as s: ...` then `s.result()`: mean/max utilisation, max memory."""

    def __init__(self, interval_s: float = 0.2, index: int = 0) -> None:
        self.interval_s, self.index = interval_s, index
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory MiB)
        self.source: str | None = None
        self.reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        nvml = self._nvml_handle()
        if nvml is not None:
            self.source, target = "nvml", lambda: self._poll_nvml(nvml)
        elif (binary := shutil.which("nvidia-smi")) is not None:
            self.source, target = "nvidia-smi", self._read_smi
            self._process = subprocess.Popen(
                [binary, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                 f"--id={self.index}", f"-lms={max(1, round(1000 * self.interval_s))}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        else:
            self.reason = "no NVML (pip install nvidia-ml-py) and no nvidia-smi on PATH"
            return self
        self._thread = threading.Thread(target=target, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._process is not None:
            self._process.wait(timeout=5)

    def result(self) -> dict:
        """What was sampled, or why nothing was."""
        if not self.samples:
            return {"source": self.source,
                    "unavailable": self.reason or "no sample arrived in time"}
        utils = [u for u, _ in self.samples]
        return {"source": self.source, "samples": len(utils),
                "util_mean_pct": round(sum(utils) / len(utils), 1),
                "util_max_pct": max(utils),
                "memory_max_mib": max(m for _, m in self.samples)}

    def _nvml_handle(self) -> object | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            return pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # noqa: BLE001 - no package, no driver, no device: try smi
            logger.debug("NVML unavailable: %s", exc)
            return None

    def _poll_nvml(self, handle: object) -> None:
        import pynvml

        while not self._stop.wait(self.interval_s):
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            self.samples.append((float(rates.gpu), round(memory.used / 2**20, 1)))

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sample = parse_smi_line(line)
            if sample is not None:
                self.samples.append(sample)
            if self._stop.is_set():
                break


def parse_smi_line(line: str) -> tuple[float, float] | None:
    """(utilisation %, memory MiB) from one `utilization.gpu,memory.used` CSV line."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return float(parts[0]), float(parts[1])
    except (IndexError, ValueError):  # "[N/A]", a header, a partial line
        return None
