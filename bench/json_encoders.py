"""Encoding /predict's answer: pydantic-core's serialiser (the service's) against orjson and
the standard library, on answers of 1 and 8 images and with every label's score.

    python -m bench.json_encoders [--classes 1000] [--seconds 1]

Each encoder writes the same dict the route builds; the bytes are checked to decode to the
same document. Prints microseconds per answer as JSON; encoders that are not installed are
reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic_core import to_json

from bench.common import emit


def answer(images: int, classes: int, *, all_scores: bool, top_k: int = 5) -> dict[str, Any]:
    """A single-label answer of the route's shape."""
    labels = [f"class_{i:04d}" for i in range(classes)]
    results = []
    for j in range(images):
        result: dict[str, Any] = {"filename": f"img{j}.jpg", "predictions": [
            {"label": labels[i], "score": 0.987654321 / (i + 1)} for i in range(top_k)]}
        if all_scores:
            result["scores"] = {label: 1.0 / (i + 1) for i, label in enumerate(labels)}
        results.append(result)
    return {"model": "resnet50", "task": "single_label", "results": results}


def encoders() -> dict[str, Callable[[Any], bytes] | None]:
    """Each encoder by name, None where it is not installed."""
    try:
        import orjson
    except ImportError:
        orjson = None
    return {"pydantic_core.to_json": to_json,
            "orjson.dumps": orjson.dumps if orjson else None,
            "json.dumps": lambda doc: json.dumps(doc, separators=(",", ":")).encode()}


def us_per_call(encode: Callable[[Any], bytes], doc: Any, seconds: float) -> float:
    """Microseconds per call, over about `seconds`."""
    calls, began = 0, time.perf_counter()
    while (spent := time.perf_counter() - began) < seconds:
        for _ in range(20):
            encode(doc)
        calls += 20
    return 1e6 * spent / calls


def main(argv: list[str] | None = None) -> dict:
    """Time every encoder on every answer shape; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    out = {}
    for images, all_scores in ((1, False), (8, False), (1, True)):
        doc = answer(images, args.classes, all_scores=all_scores)
        name = f"{images} image(s){', all scores' if all_scores else ''}"
        out[name] = {}
        for encoder, encode in encoders().items():
            if encode is None:
                out[name][encoder] = "not installed"
                continue
            if json.loads(encode(doc)) != doc:
                raise RuntimeError(f"{encoder} changed the answer")
            out[name][encoder] = round(us_per_call(encode, doc, args.seconds), 2)
    emit(out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
