"""ModelRegistry: which version of each checkpoint serves now; rescans, swaps and retires."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.config import MODEL_NAME_PATTERN, Settings
from app.exceptions import (
    CheckpointFolderError,
    ModelRequiredError,
    NotReadyError,
    ShuttingDownError,
    UnknownModelError,
)
from app.metrics import Metrics
from app.serving.compute import ComputeThread, run_in_fresh_thread
from app.serving.imaging import ImageDecoder
from app.serving.memory import release_memory
from app.serving.model_loader import ModelLoader, QueueBounds
from app.serving.served_model import ServedModel
from models import checkpoint
from models.card import ModelCard
from models.device import Accelerator

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What identifies one version of a checkpoint on disk (name, size, mtime per file)."""
    out = []
    for name in (checkpoint.CARD_FILE, checkpoint.WEIGHTS_FILE):
        try:
            st = (path / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, -1, -1))
    return tuple(out)


@dataclass
class ModelEntry:
    """One checkpoint folder as the registry sees it: loaded, loading or failed, and why."""

    name: str
    path: Path
    fingerprint: Fingerprint
    card: ModelCard | None = None
    served: ServedModel | None = None
    error: str | None = None
    loading: bool = False  # found by a scan that has not reached it yet

    @property
    def status(self) -> str:
        if self.served is not None:
            return "loaded"
        return "loading" if self.loading else "failed"


@dataclass
class ReloadReport:
    """What a rescan changed."""

    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class ModelRegistry:
    """Every checkpoint found under the checkpoint folder, by folder name."""

    def __init__(self, settings: Settings, *, accelerator: Accelerator, decoder: ImageDecoder,
                 metrics: Metrics, queue_bounds: QueueBounds | None = None) -> None:
        self.settings = settings
        self.accelerator = accelerator
        self.decoder = decoder
        self.metrics = metrics
        self.closing = False
        self._entries: dict[str, ModelEntry] = {}
        self._retiring: set[ServedModel] = set()  # swapped out, not yet stopped
        self._lock = asyncio.Lock()
        self.compute = ComputeThread()  # every model's batches run here (see app.serving.compute)
        self._loader = ModelLoader(settings, accelerator=accelerator, decoder=decoder,
                                   metrics=metrics, compute=self.compute,
                                   queue_bounds=queue_bounds)

    @property
    def ready(self) -> bool:
        """True when at least one model is loaded and warmed up, and not shutting down."""
        return not self.closing and any(e.served for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        """Every checkpoint found, loaded or failed, sorted by name."""
        return [self._entries[name] for name in sorted(self._entries)]

    def entry(self, name: str) -> ModelEntry:
        """One checkpoint by name (loaded or failed)."""
        found = self._entries.get(name)
        if found is None:
            raise UnknownModelError(name, sorted(self._entries))
        return found

    def loaded_names(self) -> list[str]:
        """Names of the models serving now."""
        return sorted(n for n, e in self._entries.items() if e.served)

    def default_name(self) -> str | None:
        """The model used when a request names none."""
        if self.settings.default_model:
            return self.settings.default_model
        loaded = self.loaded_names()
        if len(loaded) != 1 or self.loading_names():
            return None  # no implicit default while another model may still join
        return loaded[0]

    def loading_names(self) -> list[str]:
        """Names of the checkpoints a scan has found and not loaded yet."""
        return sorted(n for n, e in self._entries.items() if e.loading)

    def get(self, name: str | None = None) -> ServedModel:
        """The serving model `name` (or the default one) for a new request."""
        if self.closing:
            raise ShuttingDownError("the service is shutting down")
        loaded = self.loaded_names()
        if not loaded:
            raise NotReadyError("no model is loaded yet")
        if name is None:
            name = self.default_name()
            if name is None and self.loading_names():
                raise NotReadyError("models are still loading, so there is no default yet; "
                                    f"name one with ?model= (serving: {', '.join(loaded)})")
            if name is None:
                raise ModelRequiredError(loaded)
        found = self._entries.get(name)
        if found is not None and found.loading:
            raise NotReadyError(f"model {name!r} is still loading")
        if found is None or found.served is None:
            raise UnknownModelError(name, loaded)
        return found.served

    async def reload(self) -> ReloadReport:
        """Rescan the folder: load new or changed checkpoints, retire removed ones.

        Each checkpoint is published as soon as it is loaded (or has failed), so the service
        is ready once the first model is warm while the others still load. A checkpoint that
        fails to load keeps its previous version serving. Retired versions finish their
        requests in flight before stopping.
        """
        async with self._lock:
            if self.closing:
                raise ShuttingDownError("the service is shutting down")
            report = ReloadReport()
            try:
                paths = await asyncio.to_thread(checkpoint.find_checkpoints,
                                                self.settings.checkpoint_dir)
            except checkpoint.CheckpointError as exc:  # nothing is known: nothing changes
                raise CheckpointFolderError(
                    f"rescan skipped, the models loaded keep serving: {exc}") from None
            named = [(*model_name(path.name), path) for path in paths]
            # under --max-models the default model takes its place first, then names in order
            named.sort(key=lambda found: found[0] != self.settings.default_model)
            retired = await self._load_each(named, report)
            if not self.closing:
                gone = set(self._entries) - {entry_name for entry_name, _, _ in named}
                for name in sorted(gone):
                    retired += self._remove(name, report)
            self.metrics.reloads.inc()
        logger.info("models: loaded %s, unchanged %s, removed %s, failed %s",
                    report.loaded, report.unchanged, report.removed, sorted(report.failed))
        if retired:
            await asyncio.gather(*(s.retire(self.settings.request_timeout) for s in retired))
            self._retiring.difference_update(retired)
            retired.clear()  # the last references: their memory goes back to the OS now
            await asyncio.to_thread(release_memory)
        return report

    async def _load_each(self, named: list[tuple[str, str | None, Path]],
                         report: ReloadReport) -> list[ServedModel]:
        """Load, refuse or keep each folder found, publishing each entry as soon as it is
        known (new folders are listed as loading until then); returns the versions replaced."""
        for name, problem, path in named:
            if problem is None and name not in self._entries:
                self._entries[name] = ModelEntry(name, path, (), loading=True)
        retired: list[ServedModel] = []
        try:
            for name, problem, path in named:
                if self.closing:  # close() stops whatever has been published so far
                    break
                old = self._entries.get(name)
                if problem:
                    entry = self._refused(name, path, problem, old, report)
                elif self._over_cap(old, named):
                    entry = await self._not_loaded(name, path, report)
                else:
                    entry = await self._refresh(path, old, report)
                retired += self._publish(entry)
        finally:
            for name in self.loading_names():  # never reached: shutting down or cancelled
                del self._entries[name]
        return retired

    def _publish(self, entry: ModelEntry) -> list[ServedModel]:
        """Make `entry` the one requests see now; returns the version it replaced, if any."""
        old = self._entries.get(entry.name)
        self._entries[entry.name] = entry
        if entry.served is not None:
            self.metrics.watch_queue(entry.name, lambda s=entry.served: s.batcher.queued)
        self.metrics.models_loaded.set(len(self.loaded_names()))
        if old is None or old.served is None or old.served is entry.served:
            return []
        self._retiring.add(old.served)
        return [old.served]

    def _remove(self, name: str, report: ReloadReport) -> list[ServedModel]:
        """Drop a checkpoint whose folder is gone; returns its serving version, if any."""
        old = self._entries.pop(name)
        report.removed.append(name)
        self.metrics.models_loaded.set(len(self.loaded_names()))
        if old.served is None:
            return []
        self.metrics.forget_model(name)
        self._retiring.add(old.served)
        return [old.served]

    def _over_cap(self, old: ModelEntry | None,
                  named: list[tuple[str, str | None, Path]]) -> bool:
        """True when loading this checkpoint would pass --max-models (a new version of a
        model serving now always loads: it takes its old version's place)."""
        cap = self.settings.max_models
        if not cap or (old is not None and old.served is not None):
            return False
        present = {name for name, _, _ in named}  # those gone are removed after this scan
        return len([n for n in self.loaded_names() if n in present]) >= cap

    async def _not_loaded(self, name: str, path: Path, report: ReloadReport) -> ModelEntry:
        """The entry of a checkpoint left out by --max-models (tried again at each rescan)."""
        serving = [n for n in self.loaded_names() if n != name]
        error = (f"not loaded: max_models is {self.settings.max_models} and that many models "
                 f"are loaded ({', '.join(serving)}); raise --max-models "
                 "(RESNET_SERVE_MAX_MODELS) or remove a checkpoint folder, then reload")
        logger.warning("model %s %s", name, error)
        report.failed[name] = error
        card = await asyncio.to_thread(_try_card, path)
        return ModelEntry(name, path, (), card=card, error=error)

    @staticmethod
    def _refused(name: str, path: Path, problem: str, old: ModelEntry | None,
                 report: ReloadReport) -> ModelEntry:
        """The entry of a folder whose name cannot be a model name (never loaded)."""
        if old is not None and old.path == path:
            report.unchanged.append(name)
            return old
        logger.error("checkpoint folder refused: %s", problem)
        report.failed[name] = problem
        return ModelEntry(name, path, (), error=problem)

    async def _refresh(self, path: Path, old: ModelEntry | None,
                       report: ReloadReport) -> ModelEntry:
        name = path.name
        stamp = await asyncio.to_thread(fingerprint, path)
        if old is not None and old.fingerprint == stamp and old.path == path:
            report.unchanged.append(name)
            return old
        try:
            served = await self._load_on_fresh_thread(name, path)
        except Exception as exc:  # noqa: BLE001 - any broken checkpoint must not stop the rest
            error = checkpoint.printable(str(exc) or type(exc).__name__)
            report.failed[name] = error
            if old is not None and old.served is not None:
                logger.error("model %s: new version failed to load, keeping the previous "
                             "one: %s", name, error)
                return replace(old, error=f"reload failed, previous version serving: {error}")
            logger.error("model %s failed to load: %s", name, error)
            card = await asyncio.to_thread(_try_card, path)
            return ModelEntry(name, path, stamp, card=card, error=error)
        served.start()
        report.loaded.append(name)
        return ModelEntry(name, path, stamp, card=served.card, served=served)

    async def _load_on_fresh_thread(self, name: str, path: Path) -> ServedModel:
        """`_load` on a thread of its own. Cancelled (shutdown), it first waits, bounded, for
        that thread to end, so no load is still running torch when the process exits; the
        model it loaded is dropped, never started."""
        load = asyncio.ensure_future(
            run_in_fresh_thread(self._loader.load, name, path, name=f"load-{name}"))
        try:
            return await asyncio.shield(load)
        except asyncio.CancelledError:
            await asyncio.wait({load}, timeout=self.settings.shutdown_timeout)
            if not load.done():
                logger.warning("model %s: still loading after %g s; stopping anyway", name,
                               self.settings.shutdown_timeout)
                load.cancel()
            elif not load.cancelled():
                load.exception()  # retrieved, so a failed load is not reported as unhandled
            raise

    def begin_shutdown(self) -> None:
        """Turn not-ready and refuse new requests (safe to call from a signal handler)."""
        self.closing = True

    async def close(self, timeout: float) -> None:
        """Refuse new requests, let those in flight finish (bounded), stop every worker."""
        self.closing = True
        async with self._lock:
            served = {e.served for e in self._entries.values() if e.served is not None}
            served |= self._retiring  # versions a cancelled reload swapped out
        await asyncio.gather(*(s.retire(timeout) for s in served))
        self._retiring.clear()
        self.compute.close()


def model_name(folder: str) -> tuple[str, str | None]:
    """The model name for a checkpoint folder, and why the folder is refused (None if not).

    A folder name must follow the model-name rule; one that does not is listed under an
    escaped form of its name (quoted, control characters written out) that cannot forge a
    log line, and is never loaded nor used as a metrics label.
    """
    if MODEL_NAME_PATTERN.fullmatch(folder):
        return folder, None
    shown = ascii(folder)
    return shown, (f"folder name {shown} is not a valid model name (1 to 128 letters, digits, "
                   "'.', '_' or '-', starting with a letter or digit); the folder is not "
                   "loaded")


def _try_card(path: Path) -> ModelCard | None:
    try:
        return checkpoint.read_card(path)
    except checkpoint.CheckpointError:  # read_card raises nothing else, whatever the file
        return None


async def reload_logged(registry: ModelRegistry) -> None:
    """Rescan, logging (not raising) what goes wrong: for rescans nobody waits on."""
    try:
        await registry.reload()
    except ShuttingDownError:
        logger.info("rescan skipped: shutting down")
    except CheckpointFolderError as exc:
        logger.error("%s", exc)
    except Exception:  # noqa: BLE001 - a failed rescan must not stop the worker
        logger.exception("reload failed")
