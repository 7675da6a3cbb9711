"""A decode process: untrusted image bytes decoded where the operating system bounds them.

Pillow's decoders (libjpeg, libpng, libtiff, libwebp) are C code whose cost for a given file
cannot be known in advance. Each `DecodeProcess` runs them in a child process forked from a
forkserver that has already imported them, under an address-space limit (`RLIMIT_AS`, the
child's idle footprint plus `memory_bytes`) and a CPU backstop per image (`RLIMIT_CPU`). The
parent kills the child when the image's deadline passes or its request is withdrawn, and
starts another: a decode that blows its limit, crashes or is killed costs that one image.

Bytes in and pixels out go through one shared memory file per process (`memfd`, sized on
demand, not limited by /dev/shm); the pipe carries only a small message each way.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import multiprocessing.util
import os
import pickle
import resource
import select
import signal
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Protocol

import numpy as np

from models import decoding
from models.process_limits import limit_address_space

logger = logging.getLogger(__name__)

_REQUEST = struct.Struct("<QQQIQ")  # bytes, shared size, max pixels, CPU seconds, recipe size
_SHAPE = struct.Struct("<III")  # height, width, channels of the crop
BASE_CAPACITY = 1 << 20  # the shared file's size between large images
PROCESS_NAME = b"resnet-decode"  # what `ps` and /proc/PID/comm show for a decode process
_PRELOAD = ["app.serving.decode_box", "models.preprocessing"]  # imported once, by the forkserver


class DecodeRecipe(Protocol):
    """What a decode process runs: picklable, bytes -> uint8 HWC pixels."""

    @property
    def output_bytes(self) -> int: ...

    def __call__(self, data: bytes, max_pixels: int) -> np.ndarray: ...


@dataclass(frozen=True)
class BoxLimits:
    """What one decode may spend: memory beyond the process's idle footprint, CPU seconds."""

    memory_bytes: int
    cpu_seconds: float


class DecodeOverMemoryError(decoding.ImageTooLargeError):
    """Decoding the image needed more memory than a decode process may have."""


class DecoderCrashError(decoding.ImageDecodeError):
    """The decode process died on the image (a crash in a decoder, or its CPU backstop)."""


class DecodeStoppedError(Exception):
    """The decode was stopped before it finished: its deadline passed or it was withdrawn."""


class DecodeProcess:
    """One child process that decodes one image at a time, and the memory shared with it."""

    def __init__(self, limits: BoxLimits) -> None:
        self.limits = limits
        self._fd = _shared_file()
        os.ftruncate(self._fd, BASE_CAPACITY)
        self._map = mmap.mmap(self._fd, BASE_CAPACITY)
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._recipe: DecodeRecipe | None = None  # the last one sent to the child
        self.started = 0  # processes started so far (the first and every replacement)

    @property
    def pid(self) -> int | None:
        """The current child's process id (None before it starts)."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start a child (again, after one was killed or died)."""
        context = _context()
        parent, child = context.Pipe(duplex=True)
        process = context.Process(target=_child_main, args=(child, self.limits.memory_bytes),
                                  name="decode", daemon=True)
        process.start()
        child.close()
        reduction.send_handle(parent, self._fd, process.pid)
        self._conn, self._process = parent, process
        self._recipe = None  # the new child has none yet
        self.started += 1

    def run(self, recipe: DecodeRecipe, data: bytes, max_pixels: int, *, deadline: float,
            cancel_fd: int) -> np.ndarray:
        """`recipe(data, max_pixels)` in the child, by `deadline` (time.monotonic()); a byte
        readable on `cancel_fd` stops it. The pixels are a copy the caller owns."""
        if self._process is None:
            self.start()
        assert self._conn is not None
        capacity = self._fit(max(len(data), recipe.output_bytes))
        self._map[:len(data)] = data
        cpu = max(1, math.ceil(min(self.limits.cpu_seconds, deadline - time.monotonic() + 1)))
        sent = b"" if recipe == self._recipe else pickle.dumps(recipe)  # the child keeps it
        self._recipe = recipe
        self._conn.send_bytes(_REQUEST.pack(len(data), capacity, max_pixels, cpu, len(sent))
                              + sent)
        try:
            answer = self._answer(deadline, cancel_fd)
        finally:
            if self._map.size() > BASE_CAPACITY:
                self._map.resize(BASE_CAPACITY)  # give large images' pages back
        kind, rest = answer[:1], answer[1:]
        if kind == b"o":
            shape = _SHAPE.unpack(rest)
            return np.frombuffer(self._map, np.uint8, count=math.prod(shape)).reshape(
                shape).copy()
        if kind == b"m":
            self.restart()  # a process that ran out of memory is not trusted further
            raise DecodeOverMemoryError(
                f"decoding it needs more than the {self.limits.memory_bytes >> 20} MiB a "
                "decode process may use")
        raise (decoding.ImageTooLargeError if kind == b"t"
               else decoding.ImageDecodeError)(rest.decode("utf-8", "replace"))

    def _answer(self, deadline: float, cancel_fd: int) -> bytes:
        assert self._conn is not None and self._process is not None
        watch = select.poll()
        for fd in (self._conn.fileno(), self._process.sentinel, cancel_fd):
            watch.register(fd, select.POLLIN)
        timeout_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        ready = {fd for fd, _event in watch.poll(timeout_ms)}
        if self._conn.fileno() in ready:
            try:
                return self._conn.recv_bytes()
            except (EOFError, OSError):
                pass  # it died while answering: a crash, below
        elif cancel_fd in ready or not ready:
            self.restart()
            raise DecodeStoppedError("cancelled" if ready else "deadline passed")
        status = self._stop()
        self.start()
        raise DecoderCrashError(f"the decoder crashed on this file ({_describe_exit(status)})")

    def _fit(self, needed: int) -> int:
        if needed > self._map.size():
            self._map.resize(max(needed, BASE_CAPACITY))
        return self._map.size()

    def restart(self) -> None:
        """Kill the child (if any) and start another."""
        self._stop()
        self.start()

    def _stop(self) -> int | None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if process.is_alive():
            process.kill()
        process.join()  # reaped, and no longer among multiprocessing's children
        return process.exitcode

    def close(self) -> None:
        """Kill the child and free the shared memory."""
        self._stop()
        self._map.close()
        os.close(self._fd)


def _describe_exit(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _shared_file() -> int:
    """An anonymous file to map in both processes (memfd: RAM, not /dev/shm's size)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("decode-handoff", os.MFD_CLOEXEC)
    import tempfile  # elsewhere than Linux: an unlinked temporary file

    with tempfile.TemporaryFile() as handle:
        return os.dup(handle.fileno())


_context_cache: list[multiprocessing.context.BaseContext] = []
_context_lock = threading.Lock()
# a socket path has at most 107 bytes; multiprocessing adds about 35 to its folder's
MAX_SOCKET_FOLDER = 64


def _context() -> multiprocessing.context.BaseContext:
    """The forkserver context; its server imports the decoders once, children fork from it
    (fast, and nothing of the serving process's threads or state is copied)."""
    with _context_lock:
        if not _context_cache:
            _short_socket_folder()
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
            _context_cache.append(context)
    return _context_cache[0]


def _short_socket_folder() -> None:
    """Make multiprocessing keep its files (the forkserver's socket among them) where a socket
    path fits: a Unix socket's path has at most 107 bytes, and under a long TMPDIR the
    forkserver would fail to start ("AF_UNIX path too long")."""
    if len(tempfile.gettempdir()) <= MAX_SOCKET_FOLDER:
        return
    fallback = next((d for d in ("/tmp", "/dev/shm", "/var/tmp")
                     if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)), None)
    if fallback is None:
        logger.warning("TMPDIR %s is too long for the decode processes' socket and no short "
                       "writable folder was found", tempfile.gettempdir())
        return
    saved = tempfile.tempdir
    tempfile.tempdir = fallback
    try:
        folder = multiprocessing.util.get_temp_dir()  # made once, kept for the process
    finally:
        tempfile.tempdir = saved
    logger.info("TMPDIR is too long for a socket path; the decode processes' socket is under %s",
                folder)


# ---- in the child ----------------------------------------------------------------------


def _child_main(conn: Connection, memory_bytes: int) -> None:
    """Serve decode requests until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server's Ctrl-C is the parent's
    _name_process(PROCESS_NAME)
    try:
        fd = reduction.recv_handle(conn)
    except (EOFError, OSError):
        return  # the parent closed before handing the memory over
    shared = mmap.mmap(fd, BASE_CAPACITY)
    limit_address_space(memory_bytes)
    recipe: DecodeRecipe | None = None
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        length, capacity, max_pixels, cpu, recipe_length = _REQUEST.unpack_from(message)
        if recipe_length:
            recipe = pickle.loads(message[_REQUEST.size:])
        if shared.size() != capacity:
            shared.close()
            shared = mmap.mmap(fd, capacity)
        _limit_cpu(cpu)
        assert recipe is not None
        conn.send_bytes(_decode(recipe, bytes(shared[:length]), max_pixels, shared))


def _decode(recipe: DecodeRecipe, data: bytes, max_pixels: int, shared: mmap.mmap) -> bytes:
    """The answer to one request: b"o" + the shape (pixels in `shared`), b"m" (memory), b"t"
    + why (too large), b"i" + why (invalid)."""
    try:
        pixels = np.ascontiguousarray(recipe(data, max_pixels), dtype=np.uint8)
    except MemoryError:
        return b"m"
    except decoding.ImageTooLargeError as exc:
        return b"t" + str(exc).encode()
    except decoding.ImageDecodeError as exc:
        return b"i" + str(exc).encode()
    except (ValueError, RuntimeError, OSError, TypeError) as exc:
        return b"i" + f"cannot be transformed: {exc}".encode()
    if pixels.ndim != 3 or pixels.nbytes > shared.size():
        return b"i" + b"the decoded crop does not fit the shared buffer"
    shared[:pixels.nbytes] = memoryview(pixels).cast("B")  # one copy, into the shared file
    return b"o" + _SHAPE.pack(*pixels.shape)


def _name_process(name: bytes) -> None:
    """Set the name the OS shows for this process (Linux; elsewhere nothing)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _limit_cpu(seconds: int) -> None:
    """SIGXCPU (which ends the process) once this image has used `seconds` of CPU: a backstop
    for a decode that outlives a parent that could not kill it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used) + seconds, hard))


def drain(fd: int) -> None:
    """Read whatever is waiting on a non-blocking pipe."""
    while select.select([fd], [], [], 0)[0]:
        if not os.read(fd, 4096):
            return
