"""Exceptions for problems the user can fix; the CLI turns each into a one-line message."""

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


class ConfigError(TrainingError):
    """An option value is out of range or inconsistent with another option."""


class OutputError(TrainingError):
    """The output folder cannot be used or written as asked."""


class DiskFullError(OutputError):
    """A write failed because the disk (or the quota) is full."""


class NonFiniteError(TrainingError):
    """The training or validation loss became NaN or infinite: the run diverged."""
