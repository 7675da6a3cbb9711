"""GET /models/{name}/reports/{file}: a loaded model's training report figures.

Only the file names in REPORT_FILES are served, from the folder the registry loaded the
model from; nothing of the request becomes part of a path. A checkpoint folder may come from
a less trusted producer (a shared volume, an unpacked archive), so only regular files right in
that folder are listed or served: a symlink named like a report is never followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Path
from fastapi.responses import StreamingResponse

from app.api.auth import API_KEY_REQUIRED
from app.api.deps import RegistryDep
from app.api.routes.model_info import MAX_MODEL_NAME
from app.api.schemas import error_responses
from app.exceptions import UnknownFileError
from app.serving.registry import ModelEntry, ModelRegistry
from models.checkpoint import open_report, report_files

router = APIRouter(prefix="/models", tags=["models"], dependencies=[API_KEY_REQUIRED])

# what training writes beside a checkpoint (training.report), and nothing else
REPORT_FILES: dict[str, str] = {
    "curves.png": "image/png",
    "confusion_matrix.png": "image/png",
    "pr_curves.png": "image/png",
    "calibration.png": "image/png",
}
CHUNK_BYTES = 256 * 1024


@router.get("/{name}/reports", responses=error_responses(401, 404, 422))
async def list_reports(name: Annotated[str, Path(max_length=MAX_MODEL_NAME)],
                       registry: RegistryDep) -> dict[str, list[str]]:
    """The report figures a loaded model's checkpoint folder holds."""
    entry = _loaded(registry, name)
    return {"reports": report_files(entry.path, REPORT_FILES)}


@router.get("/{name}/reports/{file}", response_class=StreamingResponse,
            responses={200: {"content": {"image/png": {}}}, **error_responses(401, 404, 422)})
async def report_file(name: Annotated[str, Path(max_length=MAX_MODEL_NAME)],
                      file: Annotated[str, Path(max_length=64)],
                      registry: RegistryDep) -> StreamingResponse:
    """One report figure of a loaded model (404 for any other name, or one not written)."""
    entry = _loaded(registry, name)
    known = next((known for known in REPORT_FILES if known == file), None)
    if known is None:
        raise UnknownFileError(f"no report {file[:64]!r}; the reports: {', '.join(REPORT_FILES)}")
    opened = open_report(entry.path, known)  # the allow-listed name, never the request's text
    if opened is None:
        raise UnknownFileError(f"model {name!r} has no {file} (training did not write it)")
    size = os.fstat(opened.fileno()).st_size
    return StreamingResponse(_chunks(opened), media_type=REPORT_FILES[known],
                             headers={"Content-Length": str(size),
                                      "X-Content-Type-Options": "nosniff",
                                      "Cache-Control": "no-cache"})


def _chunks(opened: BinaryIO) -> Iterator[bytes]:
    """The file's bytes, read from the descriptor that was checked (never reopened by name)."""
    with opened:
        while chunk := opened.read(CHUNK_BYTES):
            yield chunk


def _loaded(registry: ModelRegistry, name: str) -> ModelEntry:
    """The registry entry of the loaded model `name` (404 when unknown or not loaded)."""
    entry = registry.entry(name)
    if entry.served is None:
        raise UnknownFileError(f"model {name!r} is not loaded ({entry.status}): no reports")
    return entry
