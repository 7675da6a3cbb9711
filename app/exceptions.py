"""Errors of the serving layer, each carrying what its answer is made of.

An error class says its HTTP status, whether the client should retry (Retry-After), how
loudly it is logged and what it means in the API description; `app/api/errors.py` turns any
of them into its answer and `app/api/schemas.py` derives the OpenAPI descriptions, so a new
error is one class here.
"""

from __future__ import annotations

import logging
from typing import ClassVar


class ServiceError(Exception):
    """Base class of the errors a request can meet in the serving layer."""

    status: ClassVar[int] = 500
    retry_after: ClassVar[int | None] = None  # seconds a client should wait, if retrying helps
    log_level: ClassVar[int] = logging.INFO
    meaning: ClassVar[str] = ""  # for the API description of its status
    headers: ClassVar[dict[str, str]] = {}

    def response_headers(self) -> dict[str, str]:
        """The headers its answer carries (Retry-After where retrying helps)."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def error_classes() -> list[type[ServiceError]]:
    """Every error class of the serving layer, most specific first."""
    found, todo = [], [ServiceError]
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo.extend(kind.__subclasses__())
    return sorted(found[1:], key=lambda kind: -len(kind.__mro__))


SHOWN_NAME = 64  # characters of an unknown name that an error message repeats


class UnknownModelError(ServiceError):
    """The requested model is not loaded."""

    status = 404
    meaning = "unknown model (the message lists the loaded ones)"

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        listing = ", ".join(known) if known else "none"
        super().__init__(f"unknown model {shown_name(name)}; loaded models: {listing}")


def shown_name(name: str) -> str:
    """A name from a request as a message quotes it: escaped, and cut past SHOWN_NAME
    characters so that a client cannot make the answer or the log line large."""
    if len(name) <= SHOWN_NAME:
        return repr(name)
    return f"{name[:SHOWN_NAME]!r}... ({len(name)} characters)"


class UnknownModelVersionError(UnknownModelError):
    """The requested model is loaded, but not in the requested version."""

    def __init__(self, name: str, version: str, serving: list[str]) -> None:
        self.name = name
        self.known = serving
        ServiceError.__init__(self, f"model {name!r} has no version {version[:64]!r}; serving "
                                    f"version {', '.join(serving) or 'none'}")


class ModelRequiredError(ServiceError):
    """Several models are loaded and the request did not say which one."""

    status = 422
    meaning = "several models are loaded and none was named"

    def __init__(self, known: list[str]) -> None:
        self.known = known
        super().__init__("several models are loaded; choose one with ?model= "
                         f"(one of: {', '.join(known)})")


class CheckpointFolderError(ServiceError):
    """The checkpoint folder itself cannot be read; the models already loaded keep serving."""

    status, retry_after, log_level = 503, 1, logging.WARNING
    meaning = "the checkpoint folder cannot be read"


class NotReadyError(ServiceError):
    """No model is loaded and warmed up yet."""

    status, retry_after = 503, 1
    meaning = "not ready yet (no model loaded and warmed up)"


class ShuttingDownError(ServiceError):
    """The service is shutting down and takes no new work."""

    status, retry_after = 503, 1
    meaning = "shutting down"


class InvalidImageError(ServiceError):
    """An uploaded file could not be decoded as an image."""

    status = 400
    meaning = "an image cannot be decoded (the message names the file)"

    def __init__(self, filename: str, problem: str) -> None:
        self.filename = filename
        super().__init__(f"file {filename!r}: {problem}")


class OversizedImageError(ServiceError):
    """An uploaded image has more pixels than allowed."""

    status = 413
    meaning = "an image's pixels, or the memory decoding it takes, over the limit"

    def __init__(self, filename: str, problem: str) -> None:
        self.filename = filename
        super().__init__(f"file {filename!r}: {problem}")


class InsufficientMemoryError(ServiceError):
    """The service ran short of memory for one upload; that request fails, the rest go on."""

    status, retry_after, log_level = 503, 1, logging.WARNING
    meaning = "the server is short of memory for this request now"

    def __init__(self, filename: str, problem: str) -> None:
        self.filename = filename
        super().__init__(f"file {filename!r}: {problem}")


class PayloadTooLargeError(ServiceError):
    """The request body or the number of images is over the limit."""

    status = 413
    meaning = "body or image count over the limit"


class UnsupportedMediaTypeError(ServiceError):
    """The request's content type is neither multipart nor image/*."""

    status = 415
    meaning = "neither multipart/form-data nor an image/* body"


class MalformedRequestError(ServiceError):
    """The request body cannot be parsed (broken multipart, body cut short)."""

    status = 400
    meaning = "the body cannot be parsed"


class InvalidRequestError(ServiceError):
    """The request is well-typed but unusable (no files, wrong field, bad multipart)."""

    status = 422
    meaning = "bad parameters"


class AuthenticationError(ServiceError):
    """A required API key is missing or wrong."""

    status = 401
    headers = {"WWW-Authenticate": "Bearer"}
    meaning = "missing or wrong API key"


class ParserUnavailableError(ServiceError):
    """The process parsing a request body stopped (or the service is shutting down)."""

    status, retry_after, log_level = 503, 1, logging.WARNING
    meaning = "the process parsing the body stopped"


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer was ready."""

    status = 499  # nginx's "client closed request": never sent, only counted


class UnknownFileError(ServiceError):
    """A file the service does not serve: not a loaded model's report, not a page file."""

    status = 404
    meaning = "no such file"


class QueueFullError(ServiceError):
    """The queue cannot take the request's items now; retry after `retry_after` seconds."""

    status = 429
    meaning = "queue full; retry after the Retry-After header's seconds"

    def __init__(self, *, requested: int, queued: int, capacity: int, retry_after: int) -> None:
        self.retry_after = retry_after  # type: ignore[misc]  # this instance's wait
        super().__init__(f"server overloaded: {queued} of {capacity} queue slots taken, "
                         f"{requested} more requested; retry after {retry_after} s")


class DeadlineExceededError(ServiceError):
    """The request's deadline passed before its items were run."""

    status, log_level = 504, logging.WARNING
    meaning = "no answer within the request timeout"


class BatcherClosedError(ServiceError):
    """The batcher is stopping or stopped and takes no new work."""

    status, retry_after, log_level = 503, 1, logging.WARNING
    meaning = "the model is being retired or the service is stopping"


class BatchFailedError(ServiceError):
    """The batch function raised; every caller in that batch gets this error."""

    status, log_level = 500, logging.ERROR
    meaning = "inference failed (the message carries the request id)"


class BatchOutOfMemoryError(BatchFailedError):
    """The batch ran out of memory (after any retries): a passing condition, not a bug."""

    status, retry_after, log_level = 503, 1, logging.WARNING
    meaning = "out of memory running the batch; retry"


class FeedbackDisabledError(ServiceError):
    """POST /feedback was called on a server started without a feedback folder."""

    status = 404
    meaning = "feedback is off (the server has no --feedback-dir)"


class StorageFullError(ServiceError):
    """A feedback write would pass its quota, or the disk refused it; nothing was written."""

    status, log_level = 507, logging.WARNING
    meaning = "the model's feedback quota or the disk is full; nothing was written"
