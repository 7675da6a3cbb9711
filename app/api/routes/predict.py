"""POST /predict: classify one or more uploaded images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic_core import to_json

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import ModelQuery, RegistryDep, SettingsDep
from app.api.schemas import PredictResponse, error_responses
from app.api.transport import UPLOAD_BODY, read_uploads, unless_disconnected
from app.exceptions import InvalidRequestError
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
