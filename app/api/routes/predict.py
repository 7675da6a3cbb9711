"""POST /predict: classify one or more uploaded images.

An ordinary request (a plain query, the service ready) takes the fast path
(app.api.fast_path): the same checks, the same `classify`, without FastAPI's routing and
dependency resolution, which cost a third of the event loop's time per request; any other
goes FastAPI's way, which answers it as declared below (and documents the route).
"""

from __future__ import annotations

import inspect
import re
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request, Response
from pydantic_core import to_json

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import MODEL_NAME_MAX_LENGTH, ModelQuery, RegistryDep, SettingsDep
from app.api.fast_path import FastPath
from app.api.schemas import PredictResponse, error_responses
from app.api.transport import UPLOAD_BODY, read_uploads, unless_disconnected
from app.config import Settings
from app.exceptions import InvalidRequestError
from app.serving.registry import ModelRegistry
from models.predict import ImageResult

router = APIRouter(tags=["predict"], dependencies=[API_KEY_REQUIRED])

MAX_TOP_K = 10_000  # above any real class count: larger values are mistakes, not requests

@router.post(
    "/predict", response_model=PredictResponse, response_model_exclude_none=True,
    openapi_extra=UPLOAD_BODY,
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 500, 503, 504),
    summary="Classify uploaded images",
)
async def predict_images(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    model: ModelQuery = None,
    top_k: Annotated[int, Query(
        ge=1, le=MAX_TOP_K, description="single-label: how many labels per image (clamped "
                                        "to the class count)")] = 5,
    threshold: Annotated[float | None, Query(
        ge=0.0, le=1.0, allow_inf_nan=False,
        description="multi-label: one score cut-off for every label (default: the "
                    "card's tuned per-class thresholds)")] = None,
    all_scores: Annotated[bool, Query(
        description="add every label's score to each result")] = False,
    reject_unknown: Annotated[bool, Query(
        description="give no labels to images flagged unknown (unlike the training data)"
    )] = False,
) -> Response:
    """Classify every uploaded image; one result per image, in upload order."""
    return await classify(request, registry, settings, model=model, top_k=top_k,
                          threshold=threshold, all_scores=all_scores,
                          reject_unknown=reject_unknown)


async def classify(request: Request, registry: ModelRegistry, settings: Settings, *,
                   model: str | None, top_k: int, threshold: float | None, all_scores: bool,
                   reject_unknown: bool) -> Response:
    """The route's work, its parameters valid: read, classify, answer."""
    served = registry.get(model)
    if reject_unknown and served.card.unknown_threshold is None:
        raise InvalidRequestError(
            f"model {served.name!r} has no unknown-input threshold (its card was written "
            "without one); retrain it to use reject_unknown")
    with served.lease():
        uploads = await read_uploads(request, settings)
        outputs = await unless_disconnected(request, served.outputs(
            uploads, timeout=settings.request_timeout))
    answers = served.answers(outputs, top_k=top_k, threshold=threshold, all_scores=all_scores,
                             reject_unknown=reject_unknown)
    request.app.state.feedback.offer(served, uploads, outputs)  # least-sure ones kept for review
    # the answer has PredictResponse's shape; written here in one pass, as validating it
    # again would cost every request as much as its HTTP parsing
    return Response(to_json({"model": served.name, "task": served.card.task,
                             "results": [_result(upload.filename, answer)
                                         for upload, answer in zip(uploads, answers,
                                                                   strict=True)]}),
                    media_type="application/json")


def _result(filename: str, answer: ImageResult) -> dict[str, Any]:
    """One image's entry of PredictResponse.results."""
    return {"filename": filename, **answer.fields()}


# the query parameters' defaults, as the route declares them
_DEFAULTS = {name: parameter.default
             for name, parameter in inspect.signature(predict_images).parameters.items()
             if name in ("model", "top_k", "threshold", "all_scores", "reject_unknown")}
# the plainest spelling of each parameter; any other is left to FastAPI to read or refuse
_TOP_K = re.compile(r"[1-9][0-9]{0,4}")
_SCORE = re.compile(r"[01](?:\.[0-9]{1,16})?")
_FLAGS = {"true": True, "false": False, "1": True, "0": False}


async def predict_fast(request: Request) -> Response | None:
    """POST /predict on the fast path; None (nothing read) leaves it to FastAPI."""
    registry = getattr(request.app.state, "registry", None)
    query = _plain_query(request.scope.get("query_string", b""))
    if registry is None or query is None:
        return None
    return await classify(request, registry, request.app.state.settings, **query)


def _plain_query(raw: bytes) -> dict[str, Any] | None:
    """The route's parameters from a query whose values all have their plainest spelling
    (and are in range), with the route's defaults; None for any other query."""
    given: dict[str, str] = {}
    if raw:  # read as Starlette reads it; a repeated parameter's last value counts
        given = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    query: dict[str, Any] = {**_DEFAULTS, "model": given.get("model")}
    if query["model"] is not None and len(query["model"]) > MODEL_NAME_MAX_LENGTH:
        return None
    if (top_k := given.get("top_k")) is not None:
        if not _TOP_K.fullmatch(top_k) or int(top_k) > MAX_TOP_K:
            return None
        query["top_k"] = int(top_k)
    if (threshold := given.get("threshold")) is not None:
        if not _SCORE.fullmatch(threshold) or float(threshold) > 1.0:
            return None
        query["threshold"] = float(threshold)
    for flag in ("all_scores", "reject_unknown"):
        if (value := given.get(flag)) is not None:
            if value not in _FLAGS:
                return None
            query[flag] = _FLAGS[value]
    return query


FAST_PATHS = (FastPath(router, "/predict", "POST", predict_fast),)
