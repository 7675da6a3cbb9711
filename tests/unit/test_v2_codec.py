"""The Open Inference Protocol codec on its own, checked against tritonclient's own
serialisers: what the client writes parses, what the codec writes the client reads."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import serialize_byte_tensor

from app.api.v2_codec import (
    NUMERIC,
    InputContract,
    InputRule,
    OutputTensor,
    encode_response,
    parse_request,
)
from app.exceptions import MalformedRequestError, PayloadTooLargeError
from models.card import Preprocessing
from models.pixels import crops_from_channels_last, crops_from_normalized
from models.preprocessing import Normalize


def contract(max_batch: int = 4, **rules: InputRule) -> InputContract:
    """The serving models' inputs at a crop of 4 (or just `rules`), PROBABILITIES out."""
    inputs = rules or {"IMAGE": InputRule("BYTES", ((-1,), (-1, 1))),
                       "PIXELS": InputRule("UINT8", ((-1, 4, 4, 3),)),
                       "NORMALIZED": InputRule("FP32", ((-1, 3, 4, 4),))}
    return InputContract(inputs=inputs, outputs=("PROBABILITIES",), max_batch=max_batch)


def client_body(*inputs: triton.InferInput, outputs: list | None = None
                ) -> tuple[bytes, str | None]:
    """The body and header length tritonclient sends for these inputs."""
    body, length = triton.InferenceServerClient.generate_request_body(
        list(inputs), outputs=outputs, request_id="req-1")
    return body, None if length is None else str(length)


def triton_input(name: str, data: np.ndarray, datatype: str, *, binary: bool
                 ) -> triton.InferInput:
    tensor = triton.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False])
def test_numeric_tensors_from_the_client_parse_exactly(binary: bool) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    floats = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    for name, data, datatype in (("PIXELS", pixels, "UINT8"), ("NORMALIZED", floats, "FP32")):
        body, length = client_body(triton_input(name, data, datatype, binary=binary))
        request = parse_request(body, length, contract=contract())
        [tensor] = request.inputs
        assert (tensor.name, tensor.datatype, tensor.shape) == (name, datatype, data.shape)
        assert isinstance(tensor.data, np.ndarray)
        np.testing.assert_array_equal(tensor.data, data)
        assert request.id == "req-1" and request.outputs is None
        assert request.binary_output  # the client asks for binary when it names no output


def test_bytes_elements_binary_and_base64() -> None:
    elements = [b"\xff\xd8first", b"", b"\x00third\x00"]
    data = np.array(elements, dtype=np.object_)
    body, length = client_body(triton_input("IMAGE", data, "BYTES", binary=True))
    assert parse_request(body, length, contract=contract()).inputs[0].data == elements
    header = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [3, 1],
                          "data": [[base64.b64encode(e).decode()] for e in elements]}]}
    assert parse_request(json.dumps(header).encode(), None,
                         contract=contract()).inputs[0].data == elements


def test_requested_outputs_and_their_parameters() -> None:
    image = triton_input("IMAGE", np.array([b"x"], dtype=np.object_), "BYTES", binary=True)
    body, length = client_body(image, outputs=[
        triton.InferRequestedOutput("PROBABILITIES", binary_data=False, class_count=2)])
    request = parse_request(body, length, contract=contract(1))
    [out] = request.outputs or []
    assert (out.name, out.binary, out.classification) == ("PROBABILITIES", False, 2)
    assert not request.binary_output


def test_declared_shape_and_batch_are_checked_before_the_data_is_read() -> None:
    header = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [5],
                          "parameters": {"binary_data_size": 10 ** 9}}]}
    with pytest.raises(PayloadTooLargeError, match="more than the 4 allowed"):
        parse_request(json.dumps(header).encode(), None, contract=contract())
    header["inputs"][0]["shape"] = [1, 10 ** 6]
    with pytest.raises(MalformedRequestError, match=r"expected \[N\] or \[N, 1\]"):
        parse_request(json.dumps(header).encode(), None, contract=contract())
    never_read = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 9, 9, 3],
                              "data": [[["ragged"], 1.5]] * 10**5}]}
    with pytest.raises(MalformedRequestError, match=r"expected \[N, 4, 4, 3\]"):
        parse_request(json.dumps(never_read).encode(), None, contract=contract())


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
@pytest.mark.parametrize("nested", [True, False])
def test_every_numeric_datatype_in_json_parses_as_the_client_wrote_it(
        datatype: str, nested: bool) -> None:
    dtype = NUMERIC[datatype]
    if dtype.kind == "b":
        data = np.array([[True, False, True], [False, False, True]])
    elif dtype.kind in "ui":
        info = np.iinfo(dtype)
        data = np.array([[info.min, 0, info.max], [1, info.max - 1, 7]], dtype=dtype)
    else:
        data = np.array([[-1.5, 0.0, 2.25], [np.finfo(dtype).max, -np.finfo(dtype).max, 3]],
                        dtype=dtype)
    body, length = client_body(triton_input("A", data.astype(dtype), datatype, binary=False))
    if nested:  # tritonclient sends it flat; nested as its shape says is valid too
        document = json.loads(body)
        document["inputs"][0]["data"] = data.tolist()
        body, length = json.dumps(document).encode(), None
    rule = InputRule(datatype, ((-1, 3),))
    [tensor] = parse_request(body, length, contract=contract(A=rule)).inputs
    assert isinstance(tensor.data, np.ndarray) and tensor.data.dtype == dtype
    np.testing.assert_array_equal(tensor.data, data.astype(dtype))


@pytest.mark.parametrize(("body", "length", "words"), [
    (b"\x89PNG", None, "invalid inference request"),
    (b'{"inputs": [{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, "2"]}]}',
     None, "must be whole numbers, found a string"),
    (b'{"inputs": [{"name": "A", "datatype": "UINT8", "shape": [2], "data": [1, 2.5]}]}',
     None, "whole numbers"),
    (b'{"inputs": [{"name": "A", "datatype": "INT8", "shape": [1], "data": [128]}]}',
     None, "[-128, 127]"),
    (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [2], "data": [1.0]}]}',
     None, "1 elements in 'data'"),
    (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [1.0],'
     b' "parameters": {"binary_data_size": 4}}]}', None, "both 'data' and"),
    (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1],'
     b' "parameters": {"binary_data_size": true}}]}', None, "whole number of bytes"),
    (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [1]}]}',
     "-3", "must be a whole number"),
    (b'{"inputs": [{"name": "A", "datatype": "FP32", "shape": [1], "data": [1]}],'
     b' "parameters": {"binary_data_output": 1}}', None, "true or false"),
])
def test_malformed_requests_say_what_is_wrong(body: bytes, length: str | None,
                                              words: str) -> None:
    datatype = json.loads(body)["inputs"][0]["datatype"] if body.startswith(b"{") else "FP32"
    with pytest.raises(MalformedRequestError) as failed:
        parse_request(body, length, contract=contract(A=InputRule(datatype, ((-1,),))))
    assert words in str(failed.value)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_through_the_client(binary: bool) -> None:
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    labels = [[b"0.75:1:dog", b"0.25:0:cat"], [b"0.5:0:cat", b""]]
    body, length = encode_response(model_name="pets", model_version="abc", request_id="r9",
                                   outputs=[OutputTensor("PROBABILITIES", "FP32", probs,
                                                         (2, 2), binary),
                                            OutputTensor("LABELS", "BYTES", labels, (2, 2),
                                                         binary)])
    assert (length is not None) == binary
    result = triton.InferenceServerClient.parse_response_body(body, header_length=length)
    assert result.get_response()["model_version"] == "abc"
    assert result.get_response()["id"] == "r9"
    np.testing.assert_array_equal(result.as_numpy("PROBABILITIES"), probs)
    got = result.as_numpy("LABELS")
    assert got.shape == (2, 2)
    as_bytes = [[e if isinstance(e, bytes) else e.encode() for e in row] for row in got]
    assert as_bytes == labels


def test_bytes_serialisation_matches_the_clients() -> None:
    rows = [[b"a", b"bcd"]]
    body, length = encode_response(model_name="m", model_version="1", request_id=None,
                                   outputs=[OutputTensor("X", "BYTES", rows, (1, 2), True)])
    assert length is not None
    ours = body[length:]
    assert ours == serialize_byte_tensor(np.array(rows, dtype=np.object_)).item()


def test_client_tensors_become_the_crops_the_model_takes() -> None:
    pre = Preprocessing(resize=4, crop=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    crops = crops_from_channels_last(pixels)
    assert crops.dtype == torch.uint8 and tuple(crops.shape) == (2, 3, 4, 4)
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), pixels)
    normalized = Normalize(pre)(crops).numpy()  # what a client normalising right sends
    assert torch.equal(crops_from_normalized(normalized, pre), crops)
    with pytest.raises(ValueError, match="outside"):
        crops_from_normalized(normalized * 10, pre)
    with pytest.raises(ValueError, match="NaN"):
        crops_from_normalized(np.full((1, 3, 4, 4), np.nan, dtype=np.float32), pre)
