"""Schemathesis against /openapi.json, in process, on the test Postgres: every endpoint, with a
team's key (the admin key for the admin endpoints) and without a key, with schema-valid and
schema-violating requests. No response may be a server error, and every response must be
documented: its status code, content type and body schema.

A small budget keeps this under a minute; ``python bench/fuzz_api.py`` runs every schemathesis
phase (stateful too) with a bigger one and reports the figures.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow  # schemathesis over every endpoint

EXAMPLES = 12  # per endpoint and key mode: about 30 s for all of them on two shared cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ADMIN_PATHS = {"/v1/teams", "/v1/teams/{team_id}/keys", "/metrics"}


def needs_admin(path: str) -> bool:
    return path in ADMIN_PATHS or path.startswith("/v1/admin/")


def _endpoints() -> list[tuple[str, str]]:
    # The OpenAPI document depends on the code only, not on the database or the settings.
    from api.main import create_app

    paths = create_app().openapi()["paths"]
    return [(method.upper(), path) for path, operations in paths.items() for method in operations]


ENDPOINTS = _endpoints()


def fuzz(operation: Any, headers: dict[str, str]) -> list[int]:
    """Run schema-valid and schema-violating cases against one operation; the statuses seen."""
    statuses: list[int] = []
    modes = [GenerationMode.POSITIVE]
    if operation.definition.raw.get("parameters") or operation.body:
        modes.append(GenerationMode.NEGATIVE)  # nothing to violate on a bare GET /healthz
    strategy = st.one_of([operation.as_strategy(generation_mode=mode, headers=headers) for mode in modes])

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        statuses.append(response.status_code)

    run()
    return statuses


def load_schema() -> Any:
    from api.main import create_app

    config = schemathesis.Config.from_dict({"cache": {"enabled": False}})  # no .schemathesis/ folder
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(), config=config)


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
def test_with_a_key(service_env: dict[str, str], make_team, method: str, path: str) -> None:  # type: ignore[no-untyped-def]
    key = service_env["W2S_ADMIN_KEY"] if needs_admin(path) else make_team().key
    statuses = fuzz(load_schema()[path][method], {"Authorization": f"Bearer {key}"})
    assert statuses and max(statuses) < 500


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
def test_without_a_key(service_env: dict[str, str], method: str, path: str) -> None:
    statuses = fuzz(load_schema()[path][method], {})
    assert statuses and max(statuses) < 500
    if path.startswith("/v1/"):
        # A malformed body may be refused first (422), but nothing under /v1 succeeds without a key.
        assert not [code for code in statuses if 200 <= code < 300]
