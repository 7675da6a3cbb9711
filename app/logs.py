"""Logging set-up (text or JSON lines) and the request id carried into every log line."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"


WORKER_TEXT_FORMAT = ("%(asctime)s %(levelname)-7s %(name)s worker=%(worker)s "
                      "[%(request_id)s] %(message)s")


class RequestIdFilter(logging.Filter):
    """Adds the current request id to each record as `request_id` (and, in a worker
    process, the worker's index as `worker`)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the id; never drops a record."""
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if self.worker is not None:
            record.worker = self.worker
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a JSON line."""
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if hasattr(record, "worker"):
            entry["worker"] = record.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, log_format: str = "text", level: str = "info",
                      worker: int | None = None) -> None:
    """Send every logger (ours and uvicorn's) to stderr in one format; call once at start
    (`worker`: this process's index among the server's workers, shown in each line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter(worker))
    text = TEXT_FORMAT if worker is None else WORKER_TEXT_FORMAT
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(text))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers[:] = []
        uv.propagate = True
