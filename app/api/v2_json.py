"""An Open Inference Protocol input's JSON `data` turned into an array, vectorised.

The data may be flat (the elements in row-major order) or nested exactly as the input's
shape; anything else (ragged rows, deeper or shallower nesting, a wrong count) is refused.
Elements must be of the datatype's JSON kind: `true`/`false` only for BOOL, whole numbers
for the integer types (within the type's range), numbers for the float types (within the
type's range; a NaN or infinity is left for the model's own check). Every step is a numpy
call over the whole tensor, never a Python loop per element.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.exceptions import MalformedRequestError

_KIND_NAMES = {bool: "true/false", int: "a whole number", float: "a fraction",
               str: "a string", list: "a list", dict: "an object", type(None): "null"}


def elements(name: str, shape: tuple[int, ...], data: Any) -> tuple[np.ndarray, set[type]]:
    """`data`'s elements as an object array of `shape`, and the Python types among them."""
    count = math.prod(shape)
    if isinstance(data, list) and len(data) not in (count, shape[0] if shape else 1):
        if data and isinstance(data[0], list):
            raise MalformedRequestError(f"input {name}: 'data' is nested with {len(data)} "
                                        f"rows at its top, its shape {list(shape)} says "
                                        f"{shape[0] if shape else 1}")
        raise MalformedRequestError(f"input {name}: {len(data)} elements in 'data', its "
                                    f"shape {list(shape)} says {count}")
    try:
        values = np.array(data, dtype=object)  # every element kept as parsed: true stays bool
    except ValueError as exc:  # nesting deeper than numpy's dimensions
        raise MalformedRequestError(f"input {name}: 'data' cannot be read as a tensor "
                                    f"({exc})") from None
    kinds = set(map(type, values.ravel().tolist()))
    if list not in kinds:  # a list among the elements: ragged rows, or nested too deep
        if values.shape == shape:
            return values, kinds
        if values.shape == (count,):
            return values.reshape(shape), kinds
    if values.ndim <= 1 and list not in kinds:
        raise MalformedRequestError(f"input {name}: {values.size} elements in 'data', its "
                                    f"shape {list(shape)} says {count}")
    raise MalformedRequestError(
        f"input {name}: 'data' is ragged or nested unlike its shape {list(shape)}: send it "
        f"flat ({count} elements) or nested exactly as the shape")


def numbers(name: str, datatype: str, dtype: np.dtype, shape: tuple[int, ...],
            data: Any) -> np.ndarray:
    """A numeric input's JSON data as an array of `dtype` and `shape` (400 saying why not)."""
    values, kinds = elements(name, shape, data)
    allowed = ({bool} if dtype.kind == "b" else {int} if dtype.kind in "ui"
               else {int, float})
    if not kinds <= allowed:
        wanted = {"b": "true or false", "u": "whole numbers", "i": "whole numbers"}.get(
            dtype.kind, "numbers")
        found = ", ".join(sorted(_KIND_NAMES.get(kind, kind.__name__)
                                 for kind in kinds - allowed))
        raise MalformedRequestError(f"input {name}: {datatype} data must be {wanted}, "
                                    f"found {found}")
    if dtype.kind == "b":
        return values.astype(dtype)
    if dtype.kind in "ui":
        return _whole_numbers(name, datatype, dtype, values)
    return _fractions(name, datatype, dtype, values)


def _whole_numbers(name: str, datatype: str, dtype: np.dtype,
                   values: np.ndarray) -> np.ndarray:
    try:
        return np.array(values, dtype=dtype)  # numpy refuses a Python int outside the type
    except OverflowError:
        info = np.iinfo(dtype)
        raise MalformedRequestError(f"input {name}: {datatype} data must lie in "
                                    f"[{info.min}, {info.max}]") from None


def _fractions(name: str, datatype: str, dtype: np.dtype, values: np.ndarray) -> np.ndarray:
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:  # a whole number of hundreds of digits
        wide = None
    if wide is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            narrow = wide.astype(dtype)
        if np.array_equal(np.isfinite(narrow), np.isfinite(wide)):
            return narrow
    limit = float(np.finfo(dtype).max)
    raise MalformedRequestError(f"input {name}: {datatype} data holds a number outside "
                                f"{datatype}'s range (about ±{limit:.4g})")
