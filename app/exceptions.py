"""Errors of the serving layer; `app/api/errors.py` maps each to an HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the errors a request can meet in the serving layer."""


SHOWN_NAME = 64  # characters of an unknown name that an error message repeats


class UnknownModelError(ServiceError):
    """The requested model is not loaded."""

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

    def __init__(self, known: list[str]) -> None:
        self.known = known
        super().__init__("several models are loaded; choose one with ?model= "
                         f"(one of: {', '.join(known)})")


class CheckpointFolderError(ServiceError):
    """The checkpoint folder itself cannot be read; the models already loaded keep serving."""


class NotReadyError(ServiceError):
    """No model is loaded and warmed up yet."""


class ShuttingDownError(ServiceError):
    """The service is shutting down and takes no new work."""


class InvalidImageError(ServiceError):
    """An uploaded file could not be decoded as an image."""

    def __init__(self, filename: str, problem: str) -> None:
        self.filename = filename
        super().__init__(f"file {filename!r}: {problem}")


class OversizedImageError(ServiceError):
    """An uploaded image has more pixels than allowed."""

    def __init__(self, filename: str, problem: str) -> None:
        self.filename = filename
        super().__init__(f"file {filename!r}: {problem}")


class InsufficientMemoryError(ServiceError):
    """The service ran short of memory for one upload; that request fails, the rest go on."""

    def __init__(self, filename: str, problem: str) -> None:
        self.filename = filename
        super().__init__(f"file {filename!r}: {problem}")


class PayloadTooLargeError(ServiceError):
    """The request body or the number of images is over the limit."""


class UnsupportedMediaTypeError(ServiceError):
    """The request's content type is neither multipart nor image/*."""


class MalformedRequestError(ServiceError):
    """The request body cannot be parsed (broken multipart, body cut short)."""


class InvalidRequestError(ServiceError):
    """The request is well-typed but unusable (no files, wrong field, bad multipart)."""


class AuthenticationError(ServiceError):
    """A required API key is missing or wrong."""


class ParserUnavailableError(ServiceError):
    """The process parsing a request body stopped (or the service is shutting down)."""


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer was ready."""


class UnknownFileError(ServiceError):
    """A file the service does not serve: not a loaded model's report, not a page file."""
