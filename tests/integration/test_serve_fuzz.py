"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): whatever a client sends, no 5xx and
no response that breaks its declared schema. Skipped with a reason when schemathesis is missing."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance  # noqa: E402

from lorafit.base.config import ServeConfig  # noqa: E402
from lorafit.serving.server import make_app  # noqa: E402

CASES = 100  # per operation


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from lorafit.serving.bench import synthetic_adapters

    root = synthetic_adapters("random:tiny", 2, 4, tmp_path_factory.mktemp("fuzz") / "adapters")
    cfg = ServeConfig(
        model="random:tiny", adapters=str(root), allow_dir=[str(root)], max_tokens_limit=8, max_prompt_tokens=64
    )
    app = make_app(cfg)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.engine.stop()


def test_no_server_error_and_responses_match_the_schema(api):
    """Every operation of the schema, CASES generated requests each (valid and invalid bodies)."""
    from hypothesis import given

    checks = [not_a_server_error, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/load_lora_adapter",
        "GET /v1/models",
    }
    sent = 0
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            nonlocal sent
            case.call_and_validate(checks=checks)
            sent += 1

        fuzz()
    print(f"fuzz: {sent} requests over {len(operations)} operations, no failure")
    assert sent >= len(operations)
