"""Service settings: one typed class, read from flags or `RESNET_SERVE_*` variables."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.serving.decode_box import BoxLimits
from models.backend_specs import BACKEND_SPECS, Backend
from models.flags import FlagSpec

ENV_PREFIX = "RESNET_SERVE_"
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
API_KEY_PATTERN = re.compile(r"[\x21-\x7e]+")  # what a header carries byte for byte


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, lowered to a cgroup v2 CPU quota
    (`docker run --cpus`), so a container's share is counted, not the host's cores."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _default_decode_workers() -> int:
    return max(1, min(4, available_cpus()))


def read_key_file(path: Path) -> list[SecretStr]:
    """The API keys in `path`, one a line; a problem is named by its line, never shown."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ValueError(f"cannot read the API key file {str(path)!r}: {reason}") from None
    keys = []
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not API_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"line {number} of the API key file {str(path)!r} holds a space "
                             "or a character outside visible ASCII; HTTP headers cannot carry "
                             "it reliably")
        keys.append(SecretStr(key))
    if not keys:
        raise ValueError(f"the API key file {str(path)!r} holds no key; leave it out to "
                         "serve without keys")
    return keys


class Settings(BaseSettings):
    """Everything the service can be told; validated together when created."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore",
                                      validate_default=True)

    checkpoint_dir: Path = Field(
        Path("checkpoints"), description="folder of checkpoints (one subfolder per model)")
    default_model: str | None = Field(
        None, description="model used when a request names none (default: the only one)")
    max_models: int = Field(
        0, ge=0, le=100_000,
        description="most models loaded at once in each server process (each costs its "
        "weights plus warm-up buffers in memory, about 70 MB for a resnet18 on the CPU); "
        "checkpoints beyond it are listed as failed with the reason, the default model and "
        "then names in order loading first (0: no limit)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free one)")
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="proxies whose X-Forwarded-For and X-Forwarded-Proto headers are "
        "believed: IP addresses or networks such as 10.0.0.0/8, comma-separated, or * for "
        "any peer (empty: none; the headers are ignored and logs show the peer's address)")
    workers: int = Field(
        0, ge=0, le=64,
        description="server processes sharing the port, each decoding and batching its own "
        "requests with its own copy of the models (0: auto, 1 when the models run on the "
        "CPU, one per 4 cores on CUDA)")
    worker_timeout: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="with several workers: seconds a worker's event loop may stall before "
        "the worker is replaced")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where models run; auto picks CUDA when present")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="autocast dtype; auto = fp32 on CPU, bf16 (else fp16) on CUDA")
    backend: Backend = Field(
        "torch", description="what runs the models: " + "; ".join(
            f"{spec.name} ({spec.summary})" for spec in BACKEND_SPECS.values()))
    max_batch_size: int = Field(32, ge=1, le=4096, description="most images run in one batch")
    max_wait_ms: float = Field(
        5.0, ge=0.0, le=10_000.0,
        description="longest wait for more images when a batch is not full and more are due")
    max_queue: int = Field(
        256, ge=1, description="most images waiting per model; beyond it requests get 429")
    request_timeout: float = Field(
        30.0, gt=0.0, le=3600.0, description="seconds a request may take before it gets 504")
    max_connections: int = Field(
        1000, ge=1, le=1_000_000,
        description="most client connections open at once; beyond it new ones get 503 "
        "(lowered at start-up to the open-file limit minus 128)")
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools",
        description="what parses HTTP requests: httptools (llhttp, in C) or h11 (pure Python, "
        "about twice the CPU per request); both keep the same deadlines, limits and refusals")
    keepalive_timeout: float = Field(
        5.0, gt=0.0, le=3600.0,
        description="seconds a connection may sit idle (before its first request or between "
        "requests) before it is closed")
    header_timeout: float = Field(
        10.0, gt=0.0, le=3600.0,
        description="seconds from a request's first byte to the end of its headers (408 beyond)")
    body_timeout: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="seconds from the end of a request's headers to the end of its body "
        "(408 beyond); raise it for large uploads over slow links")
    write_timeout: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="seconds an answer may wait for the client to take it once the "
        "connection's send buffers are full (the connection is closed beyond); while an "
        "answer waits, no further pipelined request is read")
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="largest request body in bytes (413 beyond)")
    max_images_per_request: int = Field(
        32, ge=1, description="most images in one request (413 beyond)")
    parse_processes: int = Field(
        2, ge=1, le=64,
        description="processes per server process that parse large Open Inference Protocol "
        "JSON bodies, so that parsing never stalls the other requests (started on the first "
        "such body; each about 50 MB idle, and up to about 30 times the body it parses)")
    max_pixels: int = Field(
        40_000_000, ge=1, description="most pixels in one decoded image (413 beyond)")
    api_keys: Annotated[list[SecretStr], NoDecode,
                        FlagSpec(flag="--api-key", repeat=True, metavar="KEY")] = Field(
        default_factory=list,
        description="accepted API keys (comma-separated in the environment); empty: no auth")
    api_key_file: Path | None = Field(
        None, description="a file of accepted API keys, one a line (blank lines and lines "
        "starting with # are skipped), added to api_keys; unlike --api-key, the keys do not "
        "show in the process list")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="lowest level logged")
    decode_workers: int = Field(
        default_factory=_default_decode_workers, ge=1, le=256,
        description="decode processes per server process, each decoding and resizing one "
        "upload at a time under the memory limit below (default: min(4, CPUs))")
    decode_memory_mb: int = Field(
        512, ge=64, le=1_048_576,
        description="memory one decode process may use beyond its idle footprint, in MiB; an "
        "image that needs more gets 413 (with the default 4 processes at most 2 GiB, "
        "only while four such images decode at once)")
    gpu_decode: Literal["auto", "on", "off"] = Field(
        "auto", description="decode JPEG uploads on the models' device (nvJPEG on CUDA), "
        "other images in the decode processes: auto = on CUDA only; on = on whatever device "
        "the models run on (the CPU too, to check it); off = every image in the processes")
    torch_threads: int = Field(
        0, ge=0, le=1024, description="torch intra-op threads (0: torch's default on the "
        "CPU, divided among the workers; 1 when the models run on CUDA)")
    allocator: Literal["auto", "tcmalloc", "system"] = Field(
        "auto", description="auto/tcmalloc: restart on tcmalloc when installed (faster CPU "
        "inference); system: keep the C library's malloc")
    warmup: bool = Field(
        True, description="run batch sizes 1, 2, 4, ... max_batch_size once before turning "
        "ready (without it one image still runs, to check the model's outputs)")
    reload_on_sighup: bool = Field(True, description="rescan the checkpoint folder on SIGHUP")
    shutdown_timeout: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="seconds to finish in-flight requests on shutdown before giving up")
    feedback_dir: Path | None = Field(
        None, description="folder where POST /feedback writes labelled images, a dataset "
        "folder per model in the layout fit reads (<dir>/<model>/data); unset: /feedback "
        "answers 404")
    feedback_quota_bytes: int = Field(
        1 << 30, ge=1, description="most bytes one model's feedback dataset may take; a "
        "write past it answers 507 and leaves nothing")
    feedback_new_classes: bool = Field(
        False, description="let /feedback add classes the model does not know (else 422)")
    review_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the least-sure /predict images kept in "
        "<feedback_dir>/<model>/review for a person to label (0: none kept; needs "
        "feedback_dir)")
    review_confidence: float = Field(
        0.5, gt=0.0, le=1.0, description="an image is least-sure when flagged unknown or its "
        "calibrated confidence is under this (single-label: the top score; multi-label: the "
        "least sure label's max(p, 1 - p))")
    review_quota_bytes: int = Field(
        256 << 20, ge=1, description="most bytes one model's review folder may take; past it "
        "no more images are kept")

    @field_validator("api_keys", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value().strip() for key in value):
            raise ValueError("an API key must not be empty")
        for number, key in enumerate(value, start=1):
            if not API_KEY_PATTERN.fullmatch(key.get_secret_value()):
                raise ValueError(
                    f"API key number {number} holds a space or a character outside visible "
                    "ASCII (letters, digits, punctuation); HTTP headers cannot carry it "
                    "reliably, so no request could ever match it")
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry[:64]!r} in forwarded_allow_ips is neither an IP "
                                 "address, a network (such as 10.0.0.0/8) nor *") from None
        return value

    @model_validator(mode="after")
    def _keys_from_file(self) -> Settings:
        if self.api_key_file is not None:
            self.api_keys = [*self.api_keys, *read_key_file(self.api_key_file)]
        return self

    @field_validator("default_model")
    @classmethod
    def _sane_model_name(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_NAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid model name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = []
        if self.max_queue < self.max_batch_size:
            problems.append(
                f"max_queue ({self.max_queue} images) is smaller than max_batch_size "
                f"({self.max_batch_size} images): a full batch could never be queued; "
                "raise max_queue or lower max_batch_size")
        if self.max_images_per_request > self.max_queue:
            problems.append(
                f"max_images_per_request ({self.max_images_per_request}) is larger than "
                f"max_queue ({self.max_queue}): such a request could never be accepted")
        if self.max_wait_ms / 1000.0 >= self.request_timeout:
            problems.append(
                f"max_wait_ms ({self.max_wait_ms} ms) must be well below request_timeout "
                f"({self.request_timeout} s)")
        conflict = BACKEND_SPECS[self.backend].conflicts(self.device, self.precision)
        if conflict is not None:
            problems.append(conflict)
        if self.review_rate > 0 and self.feedback_dir is None:
            problems.append("review_rate keeps images under feedback_dir: set feedback_dir")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def decode_limits(self) -> BoxLimits:
        """What one decode may spend: `decode_memory_mb`, and CPU up to the request timeout."""
        return BoxLimits(memory_bytes=self.decode_memory_mb << 20,
                         cpu_seconds=self.request_timeout + 1.0)

    def api_key_values(self) -> list[bytes]:
        """The configured keys as bytes, for constant-time comparison."""
        return [key.get_secret_value().encode() for key in self.api_keys]

    def public_dict(self) -> dict[str, object]:
        """Settings safe to log (API keys replaced by their count)."""
        data = self.model_dump(mode="json", exclude={"api_keys"})
        data["api_keys"] = f"{len(self.api_keys)} configured"
        return data
