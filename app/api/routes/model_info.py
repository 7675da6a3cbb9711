"""GET /models, GET /models/{name}, POST /models/reload."""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.api.auth import API_KEY_REQUIRED
from app.api.card_view import public_card, sendable_text
from app.api.deps import RegistryDep
from app.api.schemas import ModelInfo, ModelList, ReloadResponse, error_responses
from app.serving.registry import ModelEntry

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/models", tags=["models"], dependencies=[API_KEY_REQUIRED])

MAX_MODEL_NAME = 128  # the longest valid model name; ?model= has the same bound
RELOAD_WAIT_SECONDS = 600.0  # longest wait for the other workers' rescans


def _info(entry: ModelEntry) -> ModelInfo:
    """The entry as listed; a card that cannot be sent as JSON is left out with a note, so
    one odd card never fails the listing of every model."""
    info = ModelInfo(
        name=sendable_text(entry.name), status=entry.status,  # type: ignore[arg-type]
        error=sendable_text(entry.error) if entry.error else None,
        loaded_at=entry.served.loaded_at if entry.served else None,
        backend=entry.served.predictor.backend if entry.served else None,
        card=public_card(entry.card) if entry.card else None)
    try:  # what the JSON response will do with it
        json.dumps(info.model_dump(mode="json"), ensure_ascii=False, allow_nan=False
                   ).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        logger.warning("model %s: its card cannot be sent as JSON (%s); listed without it",
                       info.name, type(exc).__name__)
        note = "its card cannot be sent as JSON and is left out"
        info.card, info.error = None, f"{info.error}; {note}" if info.error else note
    return info


@router.get("", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(registry: RegistryDep) -> ModelList:
    """Every checkpoint found, loaded or failed (with its error)."""
    return ModelList(default=registry.default_name(),
                     models=[_info(e) for e in registry.entries()])


@router.get("/{name}", response_model=ModelInfo,
            responses=error_responses(401, 404, 422, 503))
async def get_model(name: Annotated[str, Path(max_length=MAX_MODEL_NAME)],
                    registry: RegistryDep) -> ModelInfo:
    """One checkpoint's card and status."""
    return _info(registry.entry(name))


@router.post("/reload", response_model=ReloadResponse, responses=error_responses(401, 503))
async def reload_models(request: Request, registry: RegistryDep) -> ReloadResponse:
    """Rescan the checkpoint folder; new versions swap in without dropping requests. With
    several worker processes every one rescans, and the answer comes when all have."""
    cluster = request.app.state.cluster
    report = (await cluster.reload_everywhere(registry, RELOAD_WAIT_SECONDS) if cluster
              else await registry.reload())
    return ReloadResponse(loaded=report.loaded, unchanged=report.unchanged,
                          removed=report.removed, failed=report.failed)
