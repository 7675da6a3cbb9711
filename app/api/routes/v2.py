"""The Open Inference Protocol v2 over HTTP (KServe V2, Triton's HTTP API) beside /predict.

Health probes are open to all, as /health and /ready are; every other route needs the API
key. Errors answer `{"error": ...}` (app.api.errors). Inference goes through the same
DynamicBatcher as /predict, so both APIs' images share batches. The routes are described by
the protocol itself, not in /openapi.json.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.api import v2_codec, v2_model
from app.api.auth import API_KEY_REQUIRED
from app.api.deps import ParsersDep, RegistryDep, SettingsDep
from app.api.routes import health
from app.api.transport import read_body, unless_disconnected
from app.exceptions import NotReadyError, ShuttingDownError
from app.serving.registry import ModelRegistry
from app.serving.served_model import ServedModel

EXTENSIONS = ("binary_tensor_data", "classification")
MODEL = "/models/{name}"
VERSION = "/models/{name}/versions/{version}"

probes = APIRouter(prefix="/v2/health", include_in_schema=False)
router = APIRouter(prefix="/v2", include_in_schema=False, dependencies=[API_KEY_REQUIRED])
ROUTERS = (probes, router)  # the open probes first


@probes.get("/live")
async def server_live() -> dict[str, bool]:
    """Liveness: the process answers."""
    return {"live": True}


@probes.get("/ready")
async def server_ready(request: Request, registry: RegistryDep) -> dict[str, bool]:
    """Readiness, as GET /ready decides it (503 before and while stopping)."""
    await health.ready(request, registry)
    return {"ready": True}


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """The server's name, version and the protocol extensions it supports."""
    return {"name": request.app.title, "version": request.app.version,
            "extensions": list(EXTENSIONS)}


@router.get(MODEL)
@router.get(VERSION)
async def model_metadata(name: str, registry: RegistryDep, settings: SettingsDep,
                         version: str | None = None) -> dict[str, Any]:
    """A serving model's versions, platform, inputs and outputs."""
    served = _serving(registry, name, version)
    return v2_model.metadata(served, max_batch=settings.max_images_per_request)


@router.get(MODEL + "/ready")
@router.get(VERSION + "/ready")
async def model_ready(name: str, registry: RegistryDep,
                      version: str | None = None) -> dict[str, Any]:
    """200 when the model serves (in that version); 404 unknown, 503 loading or failed."""
    entry = registry.entry(name)
    if registry.closing:
        raise ShuttingDownError("shutting down")
    if entry.served is None:
        raise NotReadyError(f"model {name!r} is {entry.status}"
                            + (f": {entry.error}" if entry.error else ""))
    v2_model.check_version(entry.served, version)
    return {"name": name, "ready": True}


@router.post(MODEL + "/infer")
@router.post(VERSION + "/infer")
async def infer(request: Request, name: str, registry: RegistryDep, settings: SettingsDep,
                parsers: ParsersDep, version: str | None = None) -> Response:
    """Run an inference request (JSON, or JSON then binary tensor data); a large JSON body
    is parsed in a parser process, never on the event loop."""
    served = _serving(registry, name, version)
    with served.lease():
        body = await read_body(request, settings.max_upload_bytes)
        header_length = request.headers.get(v2_codec.HEADER_LENGTH)
        parsed = await parsers.run(
            v2_codec.parse_request, body, header_length, size=v2_codec.json_size(
                body, header_length), contract=v2_model.contract(
                served, max_batch=settings.max_images_per_request))
        outputs = await unless_disconnected(request, v2_model.infer(
            served, parsed, timeout=settings.request_timeout))
    payload, header_length = v2_codec.encode_response(
        model_name=served.name, model_version=v2_model.version_of(served),
        request_id=parsed.id, outputs=outputs)
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream",
                    headers={v2_codec.HEADER_LENGTH: str(header_length)})


def _serving(registry: ModelRegistry, name: str, version: str | None) -> ServedModel:
    served = registry.get(name)
    v2_model.check_version(served, version)
    return served
