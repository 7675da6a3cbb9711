"""Specific errors raised by training; the CLI turns each into a one-line message."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class for problems the user can fix (bad data, bad options)."""


class DataError(TrainingError):
    """The dataset cannot be used as given."""


class EmptyClassError(DataError):
    """A class folder holds no images."""


class MissingImageError(DataError):
    """A CSV row names an image file that does not exist."""


class CsvFormatError(DataError):
    """A CSV file does not have the `image,labels` layout."""


class ClassMismatchError(DataError):
    """Validation or test data names classes the model does not know."""


class ResumeError(TrainingError):
    """A resume-state file is missing or does not fit the run."""
