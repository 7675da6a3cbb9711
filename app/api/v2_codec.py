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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from pydantic_core import from_json, to_json

from app.api import v2_json
from app.exceptions import MalformedRequestError, PayloadTooLargeError

HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES = "BYTES"
NUMERIC: dict[str, np.dtype] = {name: np.dtype(kind).newbyteorder("<") for name, kind in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.items()}
_PREFIX = struct.Struct("<I")
MAX_DIM = 2**31 - 1  # no dimension of a tensor this server takes comes near it
MAX_LENGTH_DIGITS = 18  # a header length of more digits is past any body's size

Dim = Annotated[int, Strict(), Field(ge=0, le=MAX_DIM)]


@dataclass(frozen=True)
class InputRule:
    """What one input may be: its datatype and the shapes it may have, where -1 stands for
    the batch dimension (1 to the contract's `max_batch` items)."""

    datatype: str
    shapes: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        """The shapes as a reader would write them: "[N] or [N, 1]"."""
        return " or ".join("[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"
                           for shape in self.shapes)

    def batch_of(self, shape: list[int]) -> int | None:
        """The batch size of a tensor of `shape`, or None when no allowed shape fits it."""
        for allowed in self.shapes:
            if len(shape) == len(allowed) and all(
                    want in (-1, got) for want, got in zip(allowed, shape, strict=True)):
                return shape[allowed.index(-1)]
        return None


@dataclass(frozen=True)
class InputContract:
    """What a model takes: exactly one of `inputs` per request, at most `max_batch` items,
    and any of `outputs` (each at most once). Checked on the request's header before any
    tensor data is converted."""

    inputs: Mapping[str, InputRule]
    outputs: tuple[str, ...]
    max_batch: int


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


def parse_request(body: bytes, header_length: str | None, *,
                  contract: InputContract) -> InferRequest:
    """Parse an inference request body for a model that takes `contract`. Raises
    MalformedRequestError (400) saying what is wrong, PayloadTooLargeError (413) for more
    than `contract.max_batch` items. The declared names, datatypes and shapes are checked
    before any tensor data is converted."""
    header_bytes, binary = _split(body, header_length)
    header = _read_header(header_bytes)
    _check_declared(header, contract)
    inputs, offset = [], 0
    for spec in header.inputs:
        tensor, offset = _input(spec, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise MalformedRequestError(
            f"the body holds {len(binary) - offset} bytes after the inputs' binary data "
            f"(the inputs' binary_data_size add up to {offset} of {len(binary)})")
    outputs = None if header.outputs is None else [_output(o) for o in header.outputs]
    return InferRequest(header.id, inputs, outputs,
                        _flag(header.parameters, "binary_data_output", "request") or False)


def json_size(body: bytes, header_length: str | None) -> int:
    """How many bytes of the body are JSON (what parsing it costs grows with)."""
    try:
        return len(_split(body, header_length)[0])
    except MalformedRequestError:
        return 0  # refused at once by parse_request


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not text.isascii() or len(text) > MAX_LENGTH_DIGITS:
        raise MalformedRequestError(f"{HEADER_LENGTH} must be a whole number of bytes, got "
                                    f"{header_length[:40]!r}")
    length = int(text)
    if length > len(body):
        raise MalformedRequestError(f"{HEADER_LENGTH} says the JSON header is {length} bytes, "
                                    f"but the body holds only {len(body)}")
    return body[:length], body[length:]


def _read_header(header_bytes: bytes) -> _Header:
    try:
        document = from_json(header_bytes)
    except ValueError as exc:  # the message says where, never echoes the body
        raise MalformedRequestError(f"invalid inference request: not valid JSON ({exc})") \
            from None
    try:
        return _Header.model_validate(document)
    except ValidationError as exc:
        raise MalformedRequestError(f"invalid inference request: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def _check_declared(header: _Header, contract: InputContract) -> None:
    """The header's inputs and outputs against what the model takes, before any data."""
    known = ", ".join(f"{name} ({rule.datatype})" for name, rule in contract.inputs.items())
    if len(header.inputs) != 1:
        raise MalformedRequestError(f"send exactly one input, one of {known}; got "
                                    f"{len(header.inputs)}")
    for spec in header.inputs:
        if spec.datatype != BYTES and spec.datatype not in NUMERIC:
            raise MalformedRequestError(f"input {spec.name}: unknown datatype "
                                        f"{spec.datatype!r}")
        rule = contract.inputs.get(spec.name)
        if rule is None:
            raise MalformedRequestError(f"unknown input {spec.name!r}; expected one of {known}")
        if spec.datatype != rule.datatype:
            raise MalformedRequestError(f"input {spec.name} must be {rule.datatype}, got "
                                        f"{spec.datatype}")
        batch = rule.batch_of(spec.shape)
        if batch is None or batch < 1:
            raise MalformedRequestError(f"input {spec.name}: shape {spec.shape}, expected "
                                        f"{rule.describe()} with N >= 1")
        if batch > contract.max_batch:
            raise PayloadTooLargeError(f"input {spec.name}: {batch} items, more than the "
                                       f"{contract.max_batch} allowed per request")
    names = [out.name for out in header.outputs or ()]
    for name in names:
        if name not in contract.outputs:
            raise MalformedRequestError(f"unknown output {name!r}; this model has "
                                        f"{', '.join(contract.outputs)}")
        if names.count(name) > 1:  # computed once, sent once: a second copy says nothing new
            raise MalformedRequestError(f"output {name} is requested {names.count(name)} "
                                        "times; name each output at most once")


def _input(spec: _Input, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    """One input's tensor, and the binary offset after its data."""
    size = spec.parameters.get("binary_data_size")
    count = math.prod(spec.shape)
    if size is None:
        if spec.data is None:
            raise MalformedRequestError(f"input {spec.name} has neither 'data' nor "
                                        "parameters.binary_data_size")
        data = _json_bytes(spec) if spec.datatype == BYTES else _json_numbers(spec)
        return InputTensor(spec.name, spec.datatype, tuple(spec.shape), data), offset
    if spec.data is not None:
        raise MalformedRequestError(f"input {spec.name} has both 'data' and "
                                    "parameters.binary_data_size")
    if not _is_count(size):
        raise MalformedRequestError(f"input {spec.name}: parameters.binary_data_size must be "
                                    f"a whole number of bytes, got {_shown(size)}")
    if offset + size > len(binary):
        raise MalformedRequestError(
            f"input {spec.name}: binary_data_size {_shown(size)} goes past the end of the body "
            f"({len(binary) - offset} bytes of binary data left)")
    raw = binary[offset:offset + size]
    data = (_binary_bytes(spec.name, raw, count) if spec.datatype == BYTES
            else _binary_numbers(spec, raw, count))
    return InputTensor(spec.name, spec.datatype, tuple(spec.shape), data), offset + size


def _shown(value: object) -> str:
    """A client's value as an error message quotes it: cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"


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


def _json_bytes(spec: _Input) -> list[bytes]:
    values, kinds = v2_json.elements(spec.name, tuple(spec.shape), spec.data)
    if not kinds <= {str}:
        found = ", ".join(sorted(kind.__name__ for kind in kinds - {str}))
        raise MalformedRequestError(f"input {spec.name}: every element must be a base64 "
                                    f"string, got {found}")
    out = []
    for i, item in enumerate(values.ravel().tolist()):
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise MalformedRequestError(
                f"input {spec.name}: element {i} is not valid base64 (BYTES elements in JSON "
                "are base64-encoded)") from None
    return out


def _json_numbers(spec: _Input) -> np.ndarray:
    return v2_json.numbers(spec.name, spec.datatype, NUMERIC[spec.datatype],
                           tuple(spec.shape), spec.data)


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise MalformedRequestError(f"{where} parameters.{key} must be true or false, got "
                                    f"{_shown(value)}")
    return value


def _output(spec: _Output) -> RequestedOutput:
    classes = spec.parameters.get("classification")
    if classes is not None and (not _is_count(classes) or classes < 1):
        raise MalformedRequestError(f"output {spec.name}: parameters.classification must be "
                                    f"a whole number >= 1, got {_shown(classes)}")
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
