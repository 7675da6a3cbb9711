"""POST /explain: where the model looked, as a class activation heatmap per uploaded image."""

from __future__ import annotations

import base64
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from pydantic_core import to_json

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import ModelQuery, RegistryDep, SettingsDep
from app.api.schemas import error_responses
from app.api.transport import UPLOAD_BODY, read_uploads, unless_disconnected
from app.exceptions import InvalidRequestError

router = APIRouter(tags=["explain"], dependencies=[API_KEY_REQUIRED])

MAX_LABEL_LENGTH = 512
PNG = "image/png"


@router.post(
    "/explain", openapi_extra=UPLOAD_BODY,
    responses={200: {"content": {"application/json": {}, PNG: {}},
                     "description": "per image: the class explained, its score and the "
                                    "heatmap PNG (base64), or with Accept: image/png and "
                                    "one image the PNG itself"},
               **error_responses(400, 401, 404, 413, 415, 422, 429, 503, 504)},
    summary="Class activation heatmaps of uploaded images",
)
async def explain_images(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    model: ModelQuery = None,
    label: Annotated[str | None, Query(
        alias="class", max_length=MAX_LABEL_LENGTH,
        description="the class to explain (default: each image's top class)")] = None,
    answer_format: Annotated[Literal["json", "png"] | None, Query(
        alias="format", description="png: the heatmap itself (one image only); default: "
                                    "JSON, or PNG when Accept asks for image/png")] = None,
) -> Response:
    """Explain every uploaded image; one result per image, in upload order."""
    served = registry.get(model)
    if served.explaining is None:
        raise InvalidRequestError(f"model {served.name!r} cannot be explained: it does not "
                                  "end in global average pooling and one linear layer")
    class_index = None if label is None else _class_index(served.card.classes, label)
    as_png = answer_format == "png" or (answer_format is None and _accepts_png(request))
    with served.lease():
        uploads = await read_uploads(request, settings)
        if as_png and len(uploads) != 1:
            raise InvalidRequestError(f"a PNG answer holds one image; got {len(uploads)} "
                                      "(ask for JSON to explain several)")
        explained = await unless_disconnected(request, served.explain(
            uploads, timeout=settings.request_timeout, class_index=class_index))
    if as_png:
        image = explained[0]
        return Response(image.png, media_type=PNG, headers={
            "X-Explained-Class": quote(image.label), "X-Score": f"{image.score:.6g}"})
    return Response(to_json({"model": served.name, "results": [
        {"filename": e.filename, "class": e.label, "score": e.score,
         "heatmap": base64.b64encode(e.png).decode("ascii")} for e in explained]}),
        media_type="application/json")


def _class_index(classes: list[str], label: str) -> int:
    """The index of `label` among the card's classes (422 listing them when absent)."""
    try:
        return classes.index(label)
    except ValueError:
        shown = ", ".join(repr(c) for c in classes[:50])
        more = f" and {len(classes) - 50} more" if len(classes) > 50 else ""
        raise InvalidRequestError(f"unknown class {label[:100]!r}; the model's classes: "
                                  f"{shown}{more}") from None


def _accepts_png(request: Request) -> bool:
    """True when the Accept header names image/png and not JSON."""
    accept = request.headers.get("accept", "").lower()
    return PNG in accept and "application/json" not in accept
