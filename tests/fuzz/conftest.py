"""Fuzz fixtures: the real service app on a memory broker, its lifespan running in a private loop.

Hypothesis drives synchronous test functions, so the app lives in an :class:`asyncio.Runner` that
outlives the examples: each example sends its request with ``portal.request(...)``, in the same
loop the lifespan (and the memory broker) run in.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from conveyor.client import Conveyor
from conveyor.service import ServiceSettings, create_app

#: Examples per property: small in ``make test``; raise with ``CONVEYOR_FUZZ_EXAMPLES``.
EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(default: int) -> settings:
    """Hypothesis settings of a fuzz property: ``default`` examples unless the env asks more."""
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@dataclass
class Reply:
    """One HTTP exchange: status, raw body, decoded JSON (or None) and how long it took."""

    status: int
    body: bytes
    headers: httpx.Headers
    elapsed_s: float

    def json(self) -> Any:
        """The body as JSON."""
        return httpx.Response(self.status, content=self.body).json()


class Portal:
    """Sends requests to the app from synchronous code, in the loop the app lives in."""

    def __init__(self, runner: asyncio.Runner, client: httpx.AsyncClient) -> None:
        self.runner = runner
        self.client = client

    def request(self, method: str, path: str, **options: Any) -> Reply:
        """One request; the reply with its wall time."""

        async def send() -> Reply:
            started = time.perf_counter()
            response = await self.client.request(method, path, **options)
            return Reply(
                response.status_code,
                response.content,
                response.headers,
                time.perf_counter() - started,
            )

        return self.runner.run(send())


@pytest.fixture
def portal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Portal]:
    """The service on a fresh memory broker, no token, no rate limit, lifespan running."""
    monkeypatch.delenv("CONVEYOR_TOKEN", raising=False)
    api = create_app(Conveyor("memory://"), settings=ServiceSettings(rate_limit_per_s=None))
    # debug=False: asyncio's debug mode reports every callback over 100 ms as slow, which a
    # hypothesis run on a busy machine trips for reasons that have nothing to do with the app.
    with asyncio.Runner(debug=False) as runner:
        lifespan = api.router.lifespan_context(api)
        runner.run(lifespan.__aenter__())
        transport = httpx.ASGITransport(app=api)
        client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        try:
            yield Portal(runner, client)
        finally:
            runner.run(client.aclose())
            runner.run(lifespan.__aexit__(None, None, None))
