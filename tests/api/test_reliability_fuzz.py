"""Property-based fuzzing of every operation in the app's own OpenAPI schema.

Schemathesis generates requests from the schema (valid ones, and for the parameters and
bodies of POST /predict, invalid ones too), sends them to the app in-process with its
lifespan running, and checks each answer: never a 5xx, and status code, content type,
headers and body all as the schema declares.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from tests.serving_helpers import fast_settings

pytestmark = pytest.mark.slow  # hundreds of generated requests

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
EXAMPLES = {"POST /predict": 60, "GET /models/{name}": 25,
            "POST /explain": 20}  # every other operation: 5
NEGATIVE = {"POST /predict", "POST /explain"}  # the operations with constraints to break


def wait_ready(app: object, timeout: float = 60.0) -> None:
    """Poll /ready through schemathesis's own ASGI client (its lifespan runs the loading)."""
    give_up = time.monotonic() + timeout
    with asgi.get_client(app) as client:
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < give_up, "the app did not become ready"
            time.sleep(0.05)


def fuzz(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode,
         examples: int) -> list[int]:
    """Run `examples` generated cases against one operation; returns the statuses seen."""
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        statuses.append(response.status_code)

    run()
    return statuses


def test_schema_fuzz_finds_no_server_error_or_schema_violation(make_checkpoint_dir) -> None:
    root = make_checkpoint_dir("colors", "tags")
    app = create_app(fast_settings(root, default_model="colors", max_upload_bytes=100_000))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    try:
        wait_ready(app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 11  # POST /feedback included
        seen: dict[str, list[int]] = {}
        for operation in operations:
            examples = EXAMPLES.get(operation.label, 5)
            seen[operation.label] = fuzz(operation, schemathesis.GenerationMode.POSITIVE,
                                         examples)
            if operation.label in NEGATIVE:
                seen[operation.label] += fuzz(operation, schemathesis.GenerationMode.NEGATIVE,
                                              examples)
    finally:
        asgi.shutdown_lifespans()
    statuses = [s for per_op in seen.values() for s in per_op]
    assert statuses and all(s < 500 for s in statuses)
    # the fuzzer reached past validation into decoding, not only 422s
    assert {400, 422} <= set(seen["POST /predict"]), seen["POST /predict"]
    print(f"schema fuzz: {len(statuses)} requests over {len(seen)} operations")
