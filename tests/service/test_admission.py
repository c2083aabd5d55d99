"""Server-wide admission control: past ``max_in_flight`` requests, 503 + Retry-After at once.

Requests are held in flight deterministically: their bodies are streamed by the client and each
stream waits on a gate after the app asked for it, so the app is inside the request, counted,
until the test opens the gate. No timing is asserted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI

from conveyor.client import Conveyor
from conveyor.service.admission import AdmissionControl

from .conftest import serving

Build = Callable[..., tuple[FastAPI, Conveyor]]
JOB = b'{"task": "t.noop", "args": [1]}'


def _code(response: httpx.Response) -> str | None:
    code: str | None = response.json().get("error", {}).get("code")
    return code


class HeldBody:
    """A request body that signals when the app starts reading it, then waits for ``release``."""

    def __init__(self, release: asyncio.Event) -> None:
        self.reading = asyncio.Event()
        self.release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.reading.set()
        await self.release.wait()
        yield JOB


async def _hold(
    client: httpx.AsyncClient, n: int, release: asyncio.Event, path: str = "/jobs"
) -> list[asyncio.Task[httpx.Response]]:
    """``n`` POSTs to ``path`` that are inside the app (admitted) when this returns."""
    bodies = [HeldBody(release) for _ in range(n)]
    headers = {"content-type": "application/json"}
    tasks = [
        asyncio.create_task(client.post(path, content=body, headers=headers)) for body in bodies
    ]
    for body in bodies:
        await body.reading.wait()
    return tasks


async def test_requests_beyond_the_bound_get_503_with_retry_after(build: Build) -> None:
    api, app = build("memory", max_in_flight=2)
    release = asyncio.Event()
    async with serving(api) as client:
        held = await _hold(client, 2, release)
        refused = await client.post(
            "/jobs", content=JOB, headers={"content-type": "application/json"}
        )
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        # A GET is refused too: the bound is on the server's work, not on one route.
        assert (await client.get("/queues")).status_code == 503
        # The supervisor's probe and the operator's metrics still answer.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [201, 201]
        # Slots are given back: the next request is admitted and its job stored.
        again = await client.post(
            "/jobs", content=JOB, headers={"content-type": "application/json"}
        )
        assert again.status_code == 201
        counts = await app.counts("default")
        assert counts["default"]["queued"] == 3  # the two held and this one; nothing refused


async def test_a_refused_json_rpc_call_gets_a_json_rpc_error(build: Build) -> None:
    api, _ = build("memory", max_in_flight=1)
    release = asyncio.Event()
    async with serving(api) as client:
        held = await _hold(client, 1, release)
        call = {"jsonrpc": "2.0", "method": "queue_stats", "id": 1}
        refused = await client.post("/rpc", json=call)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        body = refused.json()
        assert body["jsonrpc"] == "2.0"
        assert body["error"]["data"]["http_status"] == 503
        release.set()
        await asyncio.gather(*held)


async def test_no_bound_when_max_in_flight_is_none(build: Build) -> None:
    api, _ = build("memory", max_in_flight=None)
    release = asyncio.Event()
    async with serving(api) as client:
        held = await _hold(client, 130, release)  # past the default bound of 128
        release.set()
        responses = await asyncio.gather(*held)
    # None refused for being over a bound. (Not "all 201": on a loaded machine the broker call
    # may time out, which is a 503 of another kind, and not this test's subject.)
    refused = [r for r in responses if r.status_code == 503 and _code(r) == "overloaded"]
    assert not refused
    assert any(r.status_code == 201 for r in responses)
    assert not any(m.cls is AdmissionControl for m in api.user_middleware)


def test_the_bound_must_be_positive() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="max_in_flight"):
        AdmissionControl(app, max_in_flight=0)
