"""Response models (with the examples shown in the OpenAPI docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.exceptions import error_classes
from models.backend_specs import Backend


class PredictionOut(BaseModel):
    """One label and its probability."""

    label: str
    score: float = Field(ge=0.0, le=1.0)


class ImageResultOut(BaseModel):
    """The answer for one uploaded image."""

    filename: str
    predictions: list[PredictionOut]
    scores: dict[str, float] | None = Field(
        None, description="every label's score; only with all_scores=true")
    unknown: bool | None = Field(
        None, description="true when the image looks unlike the training data (its "
                          "unknown_score is above the card's threshold); absent for models "
                          "whose card has no unknown-input rule")
    unknown_score: float | None = Field(
        None, ge=0.0, le=2.0,
        description="cosine distance of the image's features to the nearest class mean of "
                    "the training images: 0 alike, higher less alike; with `unknown`")


class PredictResponse(BaseModel):
    """The answer to POST /predict: one result per image, in upload order."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "pets", "task": "single_label",
        "results": [{"filename": "cat.jpg", "predictions": [
            {"label": "cat", "score": 0.962}, {"label": "dog", "score": 0.031}],
            "unknown": False, "unknown_score": 0.031}],
    }]})

    model: str
    task: Literal["single_label", "multi_label"]
    results: list[ImageResultOut]


class ModelInfo(BaseModel):
    """A checkpoint found in the checkpoint folder: its card (no weights) and its status."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "pets", "status": "loaded", "error": None, "loaded_at": "2024-05-01T12:00:00+00:00",
        "backend": "torch",
        "card": {"name": "pets", "arch": "resnet34", "task": "single_label",
                 "classes": ["cat", "dog"],
                 "preprocessing": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}},
    }]})

    name: str
    status: Literal["loaded", "loading", "failed"]
    error: str | None = None
    loaded_at: str | None = None
    backend: Backend | None = None
    card: dict[str, Any] | None = None


class ModelList(BaseModel):
    """Every checkpoint found, and the model used when a request names none."""

    default: str | None
    models: list[ModelInfo]


class ReloadResponse(BaseModel):
    """What a rescan of the checkpoint folder changed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "loaded": ["pets"], "unchanged": ["birds"], "removed": [],
        "failed": {"broken": "checkpoints/broken/card.json: file is missing"},
    }]})

    loaded: list[str]
    unchanged: list[str]
    removed: list[str]
    failed: dict[str, str]


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Readiness: at least one model is loaded and warmed up."""

    status: Literal["ready"] = "ready"
    models: list[str]


class ErrorOut(BaseModel):
    """Every error body."""

    detail: str
    request_id: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, each described by what the
    error classes of that status say they mean (app.exceptions)."""
    meanings: dict[int, list[str]] = {}
    for kind in error_classes():
        if kind.meaning and kind.meaning not in meanings.setdefault(kind.status, []):
            meanings[kind.status].append(kind.meaning)
    return {status: {"model": ErrorOut, "description": "; ".join(meanings[status])}
            for status in statuses}
