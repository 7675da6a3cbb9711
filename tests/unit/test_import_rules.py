"""The dependency rules of the three packages, read from the source (imports under
TYPE_CHECKING included): models imports neither app nor training, the two never import each
other, the routes never touch torch, app's layers import downward only, and app's modules import
one another without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.server_process import ROOT


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` names in an import statement, wherever it stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _sources(package: str) -> dict[str, set[str]]:
    return {_module(path): _imports(path) for path in (ROOT / package).rglob("*.py")}


def _reaching(imports: set[str], package: str) -> set[str]:
    return {name for name in imports if name == package or name.startswith(package + ".")}


def test_models_imports_neither_app_nor_training() -> None:
    for module, imports in _sources("models").items():
        assert not _reaching(imports, "app") | _reaching(imports, "training"), module


def test_app_and_training_never_import_each_other() -> None:
    for module, imports in _sources("app").items():
        assert not _reaching(imports, "training"), module
    for module, imports in _sources("training").items():
        assert not _reaching(imports, "app"), module


def test_the_routes_never_touch_torch() -> None:
    for module, imports in _sources("app").items():
        if module.startswith("app.api"):
            assert not _reaching(imports, "torch"), module


def test_app_has_no_import_circle() -> None:
    sources = _sources("app")
    graph = {module: {name for name in imports if name in sources and name != module}
             for module, imports in sources.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(
                path[path.index(module):] + [module]))
        if module in done:
            return
        for name in sorted(graph[module]):
            visit(name, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


# What each layer of app may not import: the serving core knows neither the HTTP layer nor the
# processes (nor FastAPI), and the HTTP layer never reaches the processes or the wiring.
LAYER_RULES = {
    "app.serving": ("app.api", "app.process", "app.main", "app.__main__",
                    "fastapi", "starlette", "uvicorn"),
    "app.api": ("app.process", "app.main", "app.__main__", "uvicorn"),
}


def test_app_layers_import_downward_only() -> None:
    for module, imports in _sources("app").items():
        for layer, forbidden in LAYER_RULES.items():
            if module == layer or module.startswith(layer + "."):
                reached = [name for name in forbidden if _reaching(imports, name)]
                assert not reached, (module, reached)
