"""The container as users run it: caches its user can write, run lines that match compose.

No Docker engine here: the Dockerfile, docker-compose.yml and the command lines of the README
and docs/deployment.md are read and checked against each other and against the settings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = ROOT / "docs" / "deployment.md"
SERVICE_UID = "10001"
DRAIN_MARGIN_S = 5.0  # beyond the shutdown timeout: the lifespan's close, the process exit


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _runtime_stage() -> str:
    return (ROOT / "Dockerfile").read_text().split("AS runtime", 1)[1]


def _commands(text: str) -> list[str]:
    """Every shell command of a Dockerfile stage or a page, continuation lines joined."""
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()]


def _docker_runs() -> list[list[str]]:
    """The `docker run` lines of the README and the deployment page, split as the shell would."""
    pages = [ROOT / "README.md", DEPLOYMENT]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    return [shlex.split(line) for line in _commands(text) if line.startswith("docker run ")]


def _options(words: list[str], name: str) -> list[str]:
    """Every value given to option `name` (`--name value` or `--name=value`)."""
    found = []
    for before, word in zip(words, words[1:], strict=False):
        if before == name:
            found.append(word)
    return found + [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]


def _option(words: list[str], name: str) -> str | None:
    found = _options(words, name)
    return found[-1] if found else None


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size.lower()).groups()
    return int(number) << {"": 0, "k": 10, "m": 20, "g": 30}[unit]


def _seconds(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) if text.endswith("s") else float(text)


def test_the_image_creates_its_caches_for_its_user() -> None:
    stage = _runtime_stage()
    env = dict(re.findall(r"\b([A-Z_]+)=(\S+)", " ".join(
        line for line in _commands(stage) if line.startswith("ENV "))))
    caches = {env["TORCH_HOME"], env["MPLCONFIGDIR"]}
    assert all(c.startswith("/home/serve/.cache/") for c in caches), caches
    run = " ".join(line for line in _commands(stage) if line.startswith("RUN "))
    made = re.search(r"mkdir -p ([^&]+)", run).group(1).split()
    assert caches <= set(made), made  # a volume mounted there starts with this owner
    owned = re.search(rf"chown -R {SERVICE_UID}:{SERVICE_UID} (\S+)", run)
    assert owned and owned.group(1) == "/home/serve/.cache"
    assert re.search(r"^USER\s+" + SERVICE_UID, stage, flags=re.M)
    opened = re.search(r"chmod 1777 ([^&]+)", run).group(1).split()
    assert caches <= set(opened)  # writable by training run as the host's user too


def test_compose_volumes_land_on_directories_the_image_made(compose: dict) -> None:
    run = " ".join(line for line in _commands(_runtime_stage()) if line.startswith("RUN "))
    made = set(re.search(r"mkdir -p ([^&]+)", run).group(1).split())
    named = set(compose.get("volumes") or {})
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source in named:  # a named volume takes the owner of the folder it covers
                assert target in made, (source, target)


def test_documented_server_run_lines_wait_for_the_drain() -> None:
    runs = [words for words in _docker_runs() if "training" not in words]
    assert runs, "the docs show how to run the server"
    for words in runs:
        shutdown = Settings.model_fields["shutdown_timeout"].default
        for value in _options(words, "-e"):
            if value.startswith("RESNET_SERVE_SHUTDOWN_TIMEOUT="):
                shutdown = float(value.split("=", 1)[1])
        stop = _option(words, "--stop-timeout")
        assert stop is not None, f"docker stop would kill the drain after 10 s: {words}"
        assert float(stop) >= shutdown + DRAIN_MARGIN_S, words


def test_compose_waits_for_the_drain(compose: dict) -> None:
    api = compose["services"]["api"]
    shutdown = float(api["environment"].get("RESNET_SERVE_SHUTDOWN_TIMEOUT",
                                            Settings.model_fields["shutdown_timeout"].default))
    assert _seconds(api["stop_grace_period"]) >= shutdown + DRAIN_MARGIN_S


def test_documented_training_run_lines_match_compose(compose: dict) -> None:
    train = compose["services"]["train"]
    runs = [words for words in _docker_runs() if "training" in words]
    assert runs, "the docs show how to train with docker run"
    for words in runs:
        shm = _option(words, "--shm-size")
        assert shm and _bytes(shm) == _bytes(train["shm_size"]), words  # not Docker's 64 MB
        assert _option(words, "--user") == "$(id -u):$(id -g)", words  # to write ./checkpoints
        assert any(m.endswith(":/checkpoints") for m in _options(words, "-v")), words


def test_compose_trains_as_the_user_the_docs_name(compose: dict) -> None:
    user = compose["services"]["train"]["user"]
    variables = re.findall(r"\$\{(\w+):-(\w+)\}", user)
    assert [name for name, _ in variables] == ["TRAIN_UID", "TRAIN_GID"], user
    assert all(default == SERVICE_UID for _, default in variables)
    page = DEPLOYMENT.read_text(encoding="utf-8")
    compose_part = page.split("\n## docker compose\n", 1)[1].split("\n## ", 1)[0]
    assert "TRAIN_UID" in compose_part and "TRAIN_GID" in compose_part
    assert "mkdir -p checkpoints" in compose_part


def test_a_cpu_only_image_is_a_documented_build_arg() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, flags=re.M)
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in dockerfile
    assert "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in \
        DEPLOYMENT.read_text(encoding="utf-8")
