"""Generated requests against the OpenAPI document (schemathesis): no 5xx, responses match it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from fastapi import FastAPI

from conveyor.client import Conveyor
from conveyor.service import create_app

from .conftest import TEST_SETTINGS, LiveServer

schemathesis = pytest.importorskip("schemathesis")

MIN_CASES = 1000
TOKEN = "schemathesis-token"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_generated_requests_never_get_a_server_error(
    live_server: Callable[[FastAPI], LiveServer],
) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    app = Conveyor("memory://")
    server = live_server(create_app(app, token=TOKEN, settings=TEST_SETTINGS))
    schema = schemathesis.openapi.from_url(
        f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if result.ok().path != "/events"  # an endless stream; tests/service/test_events.py
    ]
    strategy = st.one_of(
        [op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode]
    )
    seen: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]

    @given(case=strategy)
    @settings(
        max_examples=MIN_CASES + 200,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = case.call(base_url=server.url, headers=headers, timeout=10)
        seen[f"{case.method} {case.path}"] += 1
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks, headers=headers)

    run()
    total = sum(seen.values())
    print(f"schemathesis: {total} cases, statuses {dict(sorted(statuses.items()))}")
    assert total >= MIN_CASES
    assert not any(status >= 500 for status in statuses)
    assert len(seen) == len(operations)  # every operation was exercised


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stateful_chains_follow_the_links_without_server_errors(
    live_server: Callable[[FastAPI], LiveServer],
) -> None:
    """Schemathesis' state machine walks the OpenAPI links (enqueue -> get/stop/retry/delete...).

    Random ids almost never name a job, so a 200 from ``GET /jobs/{job_id}`` shows a link
    carried a real id from an earlier response.
    """
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
        use_after_free,
    )

    app = Conveyor("memory://")
    server = live_server(create_app(app, token=TOKEN, settings=TEST_SETTINGS))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=headers)
    schema = schema.exclude(path="/events")  # an endless stream; tests/service/test_events.py
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        use_after_free,
    ]
    calls: Counter[tuple[str, str, int]] = Counter()

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, object]:
            return {"base_url": server.url, "headers": headers, "timeout": 10}

        def validate_response(
            self, response: object, case: schemathesis.Case, **kwargs: object
        ) -> None:
            status = response.status_code  # type: ignore[attr-defined]
            calls[(case.method, case.path, status)] += 1
            case.validate_response(response, checks=checks, headers=headers)

    Machine.run(
        settings=settings(
            max_examples=15,
            stateful_step_count=8,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    total = sum(calls.values())
    found = sum(n for (method, path, status), n in calls.items() if status == 200 and "{" in path)
    print(f"schemathesis stateful: {total} calls, {found} on real job ids")
    assert total >= 15
    assert not any(status >= 500 for _, _, status in calls)
    assert found > 0  # the links carried real ids
