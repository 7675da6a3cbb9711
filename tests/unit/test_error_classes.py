"""An error's status, Retry-After, log level and API meaning live on its class, once."""

from __future__ import annotations

import json
import logging
import re

import pytest

from app.api import errors
from app.api.schemas import error_responses
from app.exceptions import (
    QueueFullError,
    ServiceError,
    error_classes,
)
from tests.server_process import ROOT


def _instance(kind: type[ServiceError]) -> ServiceError:
    if kind is QueueFullError:
        return QueueFullError(requested=2, queued=8, capacity=8, retry_after=3)
    try:
        return kind("x")  # type: ignore[call-arg]
    except TypeError:
        return kind.__new__(kind)


@pytest.mark.parametrize("kind", error_classes(), ids=lambda k: k.__name__)
def test_each_answer_comes_from_its_class(kind: type[ServiceError],
                                          caplog: pytest.LogCaptureFixture) -> None:
    error = _instance(kind)
    with caplog.at_level(logging.DEBUG, logger="app.api.errors"):
        answer = errors.response_for(error)
    assert answer.status_code == kind.status
    assert ("retry-after" in answer.headers) == (error.retry_after is not None)
    for name, value in kind.headers.items():
        assert answer.headers[name] == value
    assert json.loads(answer.body)["request_id"]
    [record] = caplog.records
    assert record.levelno == kind.log_level


def test_the_api_description_of_each_status_is_what_its_errors_mean() -> None:
    statuses = sorted({kind.status for kind in error_classes() if kind.meaning})
    described = error_responses(*statuses)
    for kind in error_classes():
        if kind.meaning:
            assert kind.meaning in described[kind.status]["description"]


def test_no_other_table_maps_errors_to_statuses() -> None:
    """Outside app/exceptions.py no module pairs an error class with a status or a header."""
    mapping = re.compile(r"\w+Error\s*:\s*\d{3}\b")  # a dict entry such as Error: 503
    found = [f"{path.relative_to(ROOT)}:{number}"
             for path in (ROOT / "app").rglob("*.py") if path.name != "exceptions.py"
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if mapping.search(line)]
    assert found == []


def test_every_error_a_request_meets_is_a_service_error() -> None:
    """The batcher's errors are the service's too: one base, one handler."""
    from app.serving import batching

    for name in ("QueueFullError", "DeadlineExceededError", "BatcherClosedError",
                 "BatchFailedError", "BatchOutOfMemoryError"):
        assert issubclass(getattr(batching, name), ServiceError)
