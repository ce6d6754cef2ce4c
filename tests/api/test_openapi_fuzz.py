"""Property-based requests over the whole OpenAPI description (Schemathesis): every answer is
documented (status code and content type) and none is a server error.

Bounded (`MAX_EXAMPLES` per operation, derandomized) so it runs in CI in a couple of minutes,
on SQLite and, in CI, on PostgreSQL, where NUL bytes, non-finite floats and large integers once
gave 500s. The database holds one real job of the caller's team, so generated requests also
reach the code behind a found job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.api.conftest import job_spec

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 40


def test_every_operation_answers_only_what_it_documents(
    app: FastAPI, client: Any, admin: tuple[Any, str], dataset: dict[str, Path]
) -> None:
    assert client.post("/v1/jobs", json=job_spec(dataset)).status_code == 201
    headers = {"Authorization": f"Bearer {admin[1]}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    cases = [(op, mode) for op in operations for mode in GenerationMode]
    for operation, mode in cases:  # schema-conforming requests, then ones that break it

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(
                headers=headers,
                checks=[not_a_server_error, status_code_conformance, content_type_conformance],
            )

        try:
            check()
        except Unsatisfiable:  # nothing to break: no parameter, or none with constraints
            continue
        except Exception as err:  # collect every operation's finding, then fail once
            failures.append(f"{operation.label} ({mode.value}): {err}")
    assert not failures, "\n\n".join(failures)
