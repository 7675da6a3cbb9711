"""The routes, one module per resource; their plumbing (auth, dependencies, errors,
middleware, schemas, transport, the Open Inference Protocol codec) is in app/api.

A new endpoint is one module here holding an APIRouter named `router` (or, where the order
of several matters, a tuple `ROUTERS`): `all_routers` finds it, and the app includes it.
"""

from __future__ import annotations

import importlib
import pkgutil

from fastapi import APIRouter


def all_routers() -> list[APIRouter]:
    """Every route module's routers, in module-name order."""
    routers: list[APIRouter] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda found: found.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        routers.extend(getattr(module, "ROUTERS", None) or (module.router,))
    return routers
