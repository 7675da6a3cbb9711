"""The Open Inference Protocol's tensor codec: request bodies in, response bodies out.

Pure: bytes and numpy arrays in and out, no HTTP framework, no model. A request body is a
JSON header, optionally followed by binary tensor data (the binary tensor data extension):
the header's length then comes in the `Inference-Header-Content-Length` header, and each
input with `parameters.binary_data_size` takes that many bytes of what follows, in input
order. A binary BYTES tensor is its elements one after the other, each a 4-byte
little-endian length and then its bytes; in JSON a BYTES element is a base64 string.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from pydantic_core import to_json

from app.exceptions import MalformedRequestError, PayloadTooLargeError

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
NUMERIC: dict[str, np.dtype] = {name: np.dtype(kind).newbyteorder("<") for name, kind in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.items()}
_PREFIX = struct.Struct("<I")

Dim = Annotated[int, Strict(), Field(ge=0)]


@dataclass(frozen=True)
class InputTensor:
    """One input: numeric data as an array of `shape`, BYTES as its elements in row-major
    order."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request names; `binary` None means the request's default."""

    name: str
    binary: bool | None = None
    classification: int | None = None


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request; `outputs` None asks for every output."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None
    binary_output: bool


@dataclass(frozen=True)
class OutputTensor:
    """One output to send: FP32 etc. as an array, BYTES as a list of bytes (UTF-8 text in
    JSON)."""

    name: str
    datatype: str
    data: np.ndarray | list[list[bytes]]
    shape: tuple[int, ...]
    binary: bool


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=256)
    datatype: str = Field(max_length=16)
    shape: list[Dim] = Field(max_length=16)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Input] = Field(min_length=1, max_length=64)
    outputs: list[_Output] | None = Field(None, max_length=64)


def parse_request(body: bytes, header_length: str | None, *, max_batch: int) -> InferRequest:
    """Parse an inference request body. Raises MalformedRequestError (400) saying what is
    wrong, PayloadTooLargeError (413) for an input of more than `max_batch` in its first
    dimension."""
    header_bytes, binary = _split(body, header_length)
    try:
        header = _Header.model_validate_json(header_bytes)
    except ValidationError as exc:
        raise MalformedRequestError(f"invalid inference request: {_describe(exc)}") from None
    inputs, offset = [], 0
    for spec in header.inputs:
        _check_size(spec, max_batch)
        tensor, offset = _input(spec, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise MalformedRequestError(
            f"the body holds {len(binary) - offset} bytes after the inputs' binary data "
            f"(the inputs' binary_data_size add up to {offset} of {len(binary)})")
    outputs = None if header.outputs is None else [_output(o) for o in header.outputs]
    return InferRequest(header.id, inputs, outputs,
                        _flag(header.parameters, "binary_data_output", "request") or False)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not text.isascii():
        raise MalformedRequestError(f"{HEADER_LENGTH} must be a whole number of bytes, got "
                                    f"{header_length[:40]!r}")
    length = int(text)
    if length > len(body):
        raise MalformedRequestError(f"{HEADER_LENGTH} says the JSON header is {length} bytes, "
                                    f"but the body holds only {len(body)}")
    return body[:length], body[length:]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _check_size(spec: _Input, max_batch: int) -> None:
    if spec.shape and spec.shape[0] > max_batch:
        raise PayloadTooLargeError(f"input {spec.name}: {spec.shape[0]} items in its first "
                                   f"dimension, more than the {max_batch} allowed per request")
    if spec.datatype == BYTES and math.prod(spec.shape) > max_batch:
        raise PayloadTooLargeError(f"input {spec.name}: {math.prod(spec.shape)} elements, "
                                   f"more than the {max_batch} allowed per request")


def _input(spec: _Input, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    """One input's tensor, and the binary offset after its data."""
    if spec.datatype != BYTES and spec.datatype not in NUMERIC:
        raise MalformedRequestError(f"input {spec.name}: unknown datatype {spec.datatype!r}")
    size = spec.parameters.get("binary_data_size")
    count = math.prod(spec.shape)
    if size is None:
        if spec.data is None:
            raise MalformedRequestError(f"input {spec.name} has neither 'data' nor "
                                        "parameters.binary_data_size")
        data = (_json_bytes(spec, count) if spec.datatype == BYTES
                else _json_numbers(spec, count))
        return InputTensor(spec.name, spec.datatype, tuple(spec.shape), data), offset
    if spec.data is not None:
        raise MalformedRequestError(f"input {spec.name} has both 'data' and "
                                    "parameters.binary_data_size")
    if not _is_count(size):
        raise MalformedRequestError(f"input {spec.name}: parameters.binary_data_size must be "
                                    f"a whole number of bytes, got {size!r}")
    if offset + size > len(binary):
        raise MalformedRequestError(
            f"input {spec.name}: binary_data_size {size} goes past the end of the body "
            f"({len(binary) - offset} bytes of binary data left)")
    raw = binary[offset:offset + size]
    data = (_binary_bytes(spec.name, raw, count) if spec.datatype == BYTES
            else _binary_numbers(spec, raw, count))
    return InputTensor(spec.name, spec.datatype, tuple(spec.shape), data), offset + size


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _binary_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """A binary BYTES tensor: `count` elements, each a 4-byte LE length then its bytes."""
    elements, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if len(elements) == count:
            raise MalformedRequestError(f"input {name}: more than the {count} elements its "
                                        "shape says")
        if offset + _PREFIX.size > len(raw):
            raise MalformedRequestError(f"input {name}: element {len(elements)}'s 4-byte "
                                        "length prefix is cut short")
        (length,) = _PREFIX.unpack_from(raw, offset)
        offset += _PREFIX.size
        if offset + length > len(raw):
            raise MalformedRequestError(
                f"input {name}: element {len(elements)}'s length prefix says {length} bytes, "
                f"past the end of its data ({len(raw) - offset} bytes left)")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    if len(elements) != count:
        raise MalformedRequestError(f"input {name}: {len(elements)} elements, its shape says "
                                    f"{count}")
    return elements


def _binary_numbers(spec: _Input, raw: bytes, count: int) -> np.ndarray:
    dtype = NUMERIC[spec.datatype]
    if len(raw) != count * dtype.itemsize:
        raise MalformedRequestError(
            f"input {spec.name}: {len(raw)} bytes of data, its shape {spec.shape} of "
            f"{spec.datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(spec.shape)


def _flatten(data: Any) -> list[Any]:
    """A JSON tensor's elements in row-major order (it may be flat or nested)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def _json_bytes(spec: _Input, count: int) -> list[bytes]:
    items = _flatten(spec.data)
    if len(items) != count:
        raise MalformedRequestError(f"input {spec.name}: {len(items)} elements in 'data', "
                                    f"its shape {spec.shape} says {count}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise MalformedRequestError(f"input {spec.name}: element {i} must be a base64 "
                                        f"string, got {type(item).__name__}")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise MalformedRequestError(
                f"input {spec.name}: element {i} is not valid base64 (BYTES elements in JSON "
                "are base64-encoded)") from None
    return out


def _json_numbers(spec: _Input, count: int) -> np.ndarray:
    items = _flatten(spec.data)
    if len(items) != count:
        raise MalformedRequestError(f"input {spec.name}: {len(items)} elements in 'data', "
                                    f"its shape {spec.shape} says {count}")
    dtype = NUMERIC[spec.datatype]
    if not all(isinstance(v, (int, float)) for v in items):
        raise MalformedRequestError(f"input {spec.name}: {spec.datatype} data must be numbers")
    if dtype.kind in "ui":
        if not all(isinstance(v, int) for v in items):
            raise MalformedRequestError(f"input {spec.name}: {spec.datatype} data must be "
                                        "whole numbers")
        info = np.iinfo(dtype)
        if items and (min(items) < info.min or max(items) > info.max):
            raise MalformedRequestError(f"input {spec.name}: {spec.datatype} data must lie in "
                                        f"[{info.min}, {info.max}]")
    return np.asarray(items, dtype=dtype).reshape(spec.shape)


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise MalformedRequestError(f"{where} parameters.{key} must be true or false, got "
                                    f"{value!r}")
    return value


def _output(spec: _Output) -> RequestedOutput:
    classes = spec.parameters.get("classification")
    if classes is not None and (not _is_count(classes) or classes < 1):
        raise MalformedRequestError(f"output {spec.name}: parameters.classification must be "
                                    f"a whole number >= 1, got {classes!r}")
    return RequestedOutput(spec.name, _flag(spec.parameters, "binary_data", f"output "
                                            f"{spec.name}"), classes)


def encode_response(*, model_name: str, model_version: str, request_id: str | None,
                    outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(out.shape)}
        if out.binary:
            raw = _to_binary(out)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _to_json(out)
        entries.append(entry)
    header["outputs"] = entries
    text = to_json(header)
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


def _to_binary(out: OutputTensor) -> bytes:
    if out.datatype == BYTES:
        assert isinstance(out.data, list)
        return b"".join(_PREFIX.pack(len(e)) + e for row in out.data for e in row)
    assert isinstance(out.data, np.ndarray)
    return np.ascontiguousarray(out.data, dtype=NUMERIC[out.datatype]).tobytes()


def _to_json(out: OutputTensor) -> list[Any]:
    if out.datatype == BYTES:
        assert isinstance(out.data, list)
        return [e.decode("utf-8") for row in out.data for e in row]
    assert isinstance(out.data, np.ndarray)
    return out.data.astype(np.float64 if out.data.dtype.kind == "f" else out.data.dtype
                           ).ravel().tolist()
