"""The names of the runtimes a model can be served on, without importing any of them: the
serving settings validate against these, models.backends builds the runners."""

from __future__ import annotations

from typing import Literal, get_args

Backend = Literal["torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = get_args(Backend)
