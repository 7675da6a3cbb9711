"""POST /feedback: an image and the label(s) it should have had, into the model's dataset.

The image must decode (it goes through the server's decode processes like any upload) and
its labels must be the model's classes (or, with --feedback-new-classes, names a class
folder can hold); the store (app.serving.feedback_store) writes it atomically, named by its
content, within the model's quota.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import ModelQuery, RegistryDep, SettingsDep
from app.api.multipart import parse_form
from app.api.schemas import error_responses
from app.api.transport import FILE_FIELD, read_body, unless_disconnected
from app.config import Settings
from app.exceptions import (
    FeedbackDisabledError,
    InvalidRequestError,
    MalformedRequestError,
    UnsupportedMediaTypeError,
)
from app.serving.feedback import Feedback
from app.serving.feedback_store import checked_labels
from app.serving.imaging import Upload

router = APIRouter(tags=["feedback"], dependencies=[API_KEY_REQUIRED])

LABEL_FIELD = "label"
MAX_LABELS = 256  # label fields in one request; more is a mistake

FEEDBACK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"one image in the multipart field `{FILE_FIELD}` and its label in "
                       f"`{LABEL_FIELD}` (repeat it for each label of a multi-label model)",
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": [FILE_FIELD, LABEL_FIELD],
            "properties": {FILE_FIELD: {"type": "string", "format": "binary"},
                           LABEL_FIELD: {"type": "array", "items": {"type": "string"}}},
        }}},
    },
}


class FeedbackOut(BaseModel):
    """Where the image went: `created`, `relabelled` (it was there with other labels) or
    `unchanged`, and its path in the model's dataset folder."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "pets", "status": "created", "labels": ["cat"],
        "image": "cat/3f7c0a...e1.jpg"}]})

    model: str
    status: Literal["created", "relabelled", "unchanged"]
    labels: list[str]
    image: str


@router.post(
    "/feedback", response_model=FeedbackOut, openapi_extra=FEEDBACK_BODY,
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 503, 504, 507),
    summary="Send an image with the label it should have had",
)
async def send_feedback(request: Request, registry: RegistryDep, settings: SettingsDep,
                        model: ModelQuery = None) -> FeedbackOut:
    """Store one labelled image in the model's feedback dataset."""
    feedback: Feedback = request.app.state.feedback
    if feedback.store is None:
        raise FeedbackDisabledError("feedback is off: start the server with --feedback-dir "
                                    "(RESNET_SERVE_FEEDBACK_DIR) to accept labelled images")
    served = registry.get(model)
    with served.lease():
        upload, labels = await _read_labelled(request, settings)
        labels = checked_labels(labels, classes=served.card.classes, task=served.card.task,
                                new_classes=feedback.new_classes)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout
        await unless_disconnected(request, served.crops([upload], deadline=deadline))
    stored = await asyncio.to_thread(feedback.store.save, served.name, served.card.task,
                                     upload.data, labels)
    return FeedbackOut(model=served.name, status=stored.status, labels=stored.labels,
                       image=stored.image)


async def _read_labelled(request: Request, settings: Settings) -> tuple[Upload, list[str]]:
    """The one image and the labels of a multipart body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"unsupported content type {media or 'none'!r}: send multipart/form-data with "
            f"the image in the field {FILE_FIELD!r} and its label in {LABEL_FIELD!r}")
    body = await read_body(request, settings.max_upload_bytes)
    try:
        form = await parse_form(request.headers, body, max_files=1, max_fields=MAX_LABELS)
    except MultiPartException as exc:
        raise MalformedRequestError(f"cannot parse the multipart body ({exc.message}); send "
                                    f"one image and at most {MAX_LABELS} labels") from None
    try:
        files = [f for f in form.getlist(FILE_FIELD) if isinstance(f, UploadFile)]
        labels = [v for v in form.getlist(LABEL_FIELD) if isinstance(v, str)]
        if len(files) != 1:
            raise InvalidRequestError(f"send exactly one image in the field {FILE_FIELD!r} "
                                      f"(got {len(files)})")
        return Upload(files[0].filename or FILE_FIELD, await files[0].read()), labels
    finally:
        await form.close()
