"""The routes, one module per resource; their plumbing (auth, dependencies, errors,
middleware, schemas, transport, the Open Inference Protocol codec) is in app/api.

A new endpoint is one module here holding an APIRouter named `router` (or, where the order
of several matters, a tuple `ROUTERS`): `all_routers` finds it, and the app includes it. A
module may also declare `FAST_PATHS` (app.api.fast_path), which `all_fast_paths` finds.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from fastapi import APIRouter

from app.api.fast_path import FastPath


def _route_modules() -> list[ModuleType]:
    """Every module of this package, in name order."""
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in sorted(pkgutil.iter_modules(__path__), key=lambda found: found.name)]


def all_routers() -> list[APIRouter]:
    """Every route module's routers, in module-name order."""
    routers: list[APIRouter] = []
    for module in _route_modules():
        routers.extend(getattr(module, "ROUTERS", None) or (module.router,))
    return routers


def all_fast_paths() -> list[FastPath]:
    """Every route module's fast paths."""
    return [path for module in _route_modules() for path in getattr(module, "FAST_PATHS", ())]
