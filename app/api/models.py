"""GET /models, GET /models/{name}, POST /models/reload."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import RegistryDep
from app.api.schemas import ModelInfo, ModelList, ReloadResponse, error_responses
from app.registry import ModelEntry

router = APIRouter(prefix="/models", tags=["models"], dependencies=[API_KEY_REQUIRED])

MAX_MODEL_NAME = 128  # the longest valid model name; ?model= has the same bound
RELOAD_WAIT_SECONDS = 600.0  # longest wait for the other workers' rescans


def _info(entry: ModelEntry) -> ModelInfo:
    return ModelInfo(
        name=entry.name, status=entry.status, error=entry.error,  # type: ignore[arg-type]
        loaded_at=entry.served.loaded_at if entry.served else None,
        backend=entry.served.predictor.backend if entry.served else None,  # type: ignore[arg-type]
        card=entry.card.to_dict() if entry.card else None)


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
