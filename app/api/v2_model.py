"""What a served model is in Open Inference Protocol terms: its version, metadata, inputs
and outputs, and one inference request run on it.

Inputs (exactly one per request):
    IMAGE       BYTES [N] or [N, 1]    encoded image files, decoded as POST /predict does
    PIXELS      UINT8 [N, H, W, 3]     RGB already resized and center-cropped (H = W = crop)
    NORMALIZED  FP32  [N, 3, H, W]     the same crops as (pixel / 255 - mean) / std
Outputs:
    PROBABILITIES  FP32 [N, C]; with parameters.classification = k, BYTES [N, k] of
                   "score:index:label" (Triton's classification extension)
    UNKNOWN_SCORE  FP32 [N], for a card with an unknown-input rule: the score /predict
                   gives as `unknown_score` (above the threshold in the metadata: unknown)
A request naming no outputs gets all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.api.v2_codec import (
    BYTES,
    InferRequest,
    InputContract,
    InputRule,
    InputTensor,
    OutputTensor,
    RequestedOutput,
)
from app.exceptions import MalformedRequestError, UnknownModelVersionError
from app.serving.imaging import Upload
from app.serving.served_model import ServedModel
from models.backend_specs import backend_spec
from models.image_formats import accepted_text

IMAGE, PIXELS, NORMALIZED = "IMAGE", "PIXELS", "NORMALIZED"
PROBABILITIES = "PROBABILITIES"
UNKNOWN_SCORE = "UNKNOWN_SCORE"
INPUT_TYPES = {IMAGE: BYTES, PIXELS: "UINT8", NORMALIZED: "FP32"}
UNVERSIONED = "1"  # the version of a checkpoint whose card names no weights digest
VERSION_DIGITS = 12


def version_of(served: ServedModel) -> str:
    """The model's one version: the first 12 hex digits of its weights' sha256 (the card's
    `weights_sha256`, as /models shows it), or "1" for a card without one."""
    digest = served.card.weights_sha256
    return digest[:VERSION_DIGITS] if digest else UNVERSIONED


def check_version(served: ServedModel, version: str | None) -> None:
    """Pass when `version` is None (any) or the model's version; else 404."""
    if version is not None and version != version_of(served):
        raise UnknownModelVersionError(served.name, version, [version_of(served)])


def contract(served: ServedModel, *, max_batch: int) -> InputContract:
    """What the model takes: one of IMAGE, PIXELS or NORMALIZED at its crop size, and its
    outputs; a request is checked against it before its tensor data is converted."""
    crop = served.card.preprocessing.crop
    return InputContract(
        inputs={IMAGE: InputRule(INPUT_TYPES[IMAGE], ((-1,), (-1, 1))),
                PIXELS: InputRule(INPUT_TYPES[PIXELS], ((-1, crop, crop, 3),)),
                NORMALIZED: InputRule(INPUT_TYPES[NORMALIZED], ((-1, 3, crop, crop),))},
        outputs=tuple(output_names(served)), max_batch=max_batch)


def metadata(served: ServedModel, *, max_batch: int) -> dict[str, Any]:
    """The model metadata answer: name, versions, platform, inputs and outputs."""
    card, pre = served.card, served.card.preprocessing
    crop = pre.crop
    scores = "softmax" if card.task == "single_label" else "sigmoid"
    return {
        "name": served.name, "versions": [version_of(served)],
        "platform": backend_spec(served.predictor.backend).platform,
        "inputs": [
            {"name": IMAGE, "datatype": BYTES, "shape": [-1], "parameters": {
                "content": f"encoded image files, one per element ({accepted_text()}); "
                           "shape [N] or [N, 1]; base64 strings in JSON"}},
            {"name": PIXELS, "datatype": INPUT_TYPES[PIXELS], "shape": [-1, crop, crop, 3],
             "parameters": {"layout": "NHWC", "content": "RGB pixels, already resized and "
                            "center-cropped; the server normalises them"}},
            {"name": NORMALIZED, "datatype": INPUT_TYPES[NORMALIZED],
             "shape": [-1, 3, crop, crop],
             "parameters": {"layout": "NCHW", "content": "RGB crops as (pixel / 255 - mean) "
                            "/ std per channel, with this model's mean and std"}}],
        "outputs": [{"name": PROBABILITIES, "datatype": "FP32",
                     "shape": [-1, card.num_classes], "parameters": {
                         "scores": f"{scores}(logits / temperature)",
                         "classification": "score:index:label strings"}}]
        + ([{"name": UNKNOWN_SCORE, "datatype": "FP32", "shape": [-1], "parameters": {
              "method": card.unknown["method"], "threshold": card.unknown_threshold,
              "content": "above the threshold: unlike the training data"}}]
           if card.unknown is not None else []),
        "parameters": {key: value for key, value in {
            "task": card.task, "classes": list(card.classes), "thresholds": card.thresholds,
            "temperature": card.temperature, "max_batch_size": max_batch,
            "preprocessing": {"resize": pre.resize, "crop": crop, "mean": list(pre.mean),
                              "std": list(pre.std), "interpolation": pre.interpolation},
        }.items() if value is not None},  # a card without thresholds or temperature: absent
    }


async def infer(served: ServedModel, request: InferRequest, *, timeout: float
                ) -> list[OutputTensor]:
    """Run one request parsed against the model's contract (one input of an allowed shape,
    known outputs, each once): its outputs are checked before any work is spent."""
    [tensor] = request.inputs
    wanted = (request.outputs if request.outputs is not None
              else [RequestedOutput(name) for name in output_names(served)])
    for out in wanted:
        if out.name == UNKNOWN_SCORE and out.classification is not None:
            raise MalformedRequestError(f"classification applies to {PROBABILITIES} only")
    outputs = await served.outputs(await _images(served, tensor), timeout=timeout)
    probs = served.probabilities(outputs)
    unknown = served.unknown_scores(outputs)
    return [_unknown_output(out, unknown.numpy(), request.binary_output)
            if out.name == UNKNOWN_SCORE and unknown is not None
            else _output(served, out, probs, request.binary_output) for out in wanted]


def _unknown_output(out: RequestedOutput, unknown: np.ndarray,
                    binary_default: bool) -> OutputTensor:
    binary = binary_default if out.binary is None else out.binary
    return OutputTensor(UNKNOWN_SCORE, "FP32", unknown.astype(np.float32), (len(unknown),),
                        binary)


def output_names(served: ServedModel) -> list[str]:
    """The outputs this model answers: PROBABILITIES, and UNKNOWN_SCORE with the rule."""
    return [PROBABILITIES] + ([UNKNOWN_SCORE] if served.card.unknown is not None else [])


async def _images(served: ServedModel, tensor: InputTensor) -> list[Upload] | list[Any]:
    """The input's images, as the served model takes them: uploads (IMAGE) or crops."""
    if tensor.name == IMAGE:
        assert isinstance(tensor.data, list)
        return [Upload(f"{IMAGE}[{i}]", data) for i, data in enumerate(tensor.data)]
    assert isinstance(tensor.data, np.ndarray)
    if tensor.name == PIXELS:
        return served.crops_from_pixels(tensor.data)
    try:
        return await served.crops_from_normalized(tensor.data)
    except ValueError as exc:
        raise MalformedRequestError(f"input {NORMALIZED}: {exc}") from None


def _output(served: ServedModel, out: RequestedOutput, probs: Any,
            binary_default: bool) -> OutputTensor:
    binary = binary_default if out.binary is None else out.binary
    if out.classification is None:
        values = probs.numpy()
        return OutputTensor(out.name, "FP32", values, tuple(values.shape), binary)
    ranked = served.ranked(probs, out.classification)
    width = max(len(row) for row in ranked)  # multi-label rows pass different counts
    rows = [[f"{p.score!r}:{p.index}:{p.label}".encode() for p in row]
            + [b""] * (width - len(row)) for row in ranked]
    return OutputTensor(out.name, BYTES, rows, (len(rows), width), binary)
