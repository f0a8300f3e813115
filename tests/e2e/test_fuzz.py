"""Schemathesis against the served gateway's own OpenAPI schema (``/v1/openapi.json``).

For ``POST /v1/chat/completions``, ``POST /v1/compress`` and ``GET /usage`` it generates valid and
invalid requests from the declared schemas (ccproxy/openapi.py) and checks each answer: no 5xx,
a declared status code and content type, a body that matches the declared schema. The upstream
is the fault upstream's normal answer (generated model names never name a fault).

The CI run is bounded: CCPROXY_FUZZ_EXAMPLES (default 50) examples per operation. A longer run:
``CCPROXY_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/e2e/test_fuzz.py -q`` (see
docs/RELIABILITY.md, also for the schemathesis CLI against a running server).
"""

from __future__ import annotations

import os

import pytest

# A dev dependency (schemathesis==4.32.5, which brings hypothesis); skipped, loudly, where missing.
schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis==4.32.5 (dev dependency)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from harness.servers import create_key

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("CCPROXY_FUZZ_EXAMPLES", "50"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzz_key(database_url: str) -> str:
    return create_key({"CCPROXY_DATABASE_URL": database_url}, "fuzz")


OPERATIONS = [
    ("/v1/chat/completions", "POST"), ("/v1/responses", "POST"), ("/v1/messages", "POST"),
    ("/v1/messages/count_tokens", "POST"), ("/v1/compress", "POST"), ("/usage", "GET"),
]


@pytest.fixture(scope="module")
def gateway_schema(faults_gateway: str):
    return schemathesis.openapi.from_url(f"{faults_gateway}/v1/openapi.json")


# schemathesis' own pytest plugin (schema.parametrize with a fixture) breaks on pytest 9 (it reads
# the removed Item._nodeid), so each operation's case strategy drives a plain hypothesis test.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_no_5xx_and_answers_match_the_schema(
    gateway_schema, faults_gateway: str, fuzz_key: str, path: str, method: str, mode: GenerationMode
) -> None:
    operation = gateway_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,  # no .hypothesis/ directory in the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    def exchange(case) -> None:
        case.call_and_validate(
            base_url=faults_gateway, headers={"x-api-key": fuzz_key}, timeout=30, checks=CHECKS
        )

    exchange()
