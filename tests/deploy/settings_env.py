"""What deployment files may set: `RESNET_SERVE_*` variables that name Settings fields."""

from __future__ import annotations

from collections.abc import Iterable

from app.config import Settings

PREFIX = Settings.model_config["env_prefix"]


def not_settings(names: Iterable[str]) -> list[str]:
    """The `RESNET_SERVE_*` names among `names` that are no Settings field, sorted."""
    fields = {name.upper() for name in Settings.model_fields}
    return sorted(n for n in names if n.startswith(PREFIX) and n[len(PREFIX):] not in fields)


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings these `RESNET_SERVE_*` values make (raises if any is invalid)."""
    values = {name[len(PREFIX):].lower(): value for name, value in env.items()
              if name.startswith(PREFIX)}
    return Settings(**values)
