"""Auth on every route but /health, the bind rule, body cap, content type, rate limit, and 503
fast when the broker is down."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.brokers.memory import MemoryBroker
from conveyor.client import Conveyor
from conveyor.errors import ConfigurationError
from conveyor.service import ServiceSettings, create_app
from conveyor.service.security import RateLimiter, SecurityMiddleware, require_token
from conveyor.testing.redis_server import RedisServer, redis_server_binary

from .asgi import SSEStream, WSSession
from .conftest import TEST_SETTINGS, serving

TOKEN = "s3cret-token-value"
Build = Callable[..., tuple[FastAPI, Conveyor]]


def _routes(api: FastAPI) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the OpenAPI document, the docs pages and / (dashboard)."""
    out = [("GET", "/"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json")]
    for path, operations in api.openapi()["paths"].items():
        concrete = path.replace("{job_id}", "j1").replace("{queue}", "q1")
        out += [(method.upper(), concrete) for method in operations]
    return out


@pytest.fixture
async def guarded(build: Build) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    api, _ = build("memory", token=TOKEN)
    async with serving(api) as client:
        yield api, client


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, "Bearer"])
async def test_every_route_but_health_needs_the_token(
    guarded: tuple[FastAPI, httpx.AsyncClient], header: str | None
) -> None:
    api, client = guarded
    headers = {"authorization": header} if header else {}
    routes = _routes(api)
    assert {"/", "/docs", "/openapi.json", "/metrics", "/rpc", "/events", "/jobs"} <= {
        p for _, p in routes
    }
    for method, path in routes:
        response = await client.request(
            method, path, headers=headers, json={} if method == "POST" else None
        )
        if path == "/health":
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "wrong-token" not in response.text
        assert TOKEN not in response.text


async def test_the_right_token_opens_every_route(
    guarded: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    api, client = guarded
    for method, path in _routes(api):
        if path == "/events":
            continue  # a stream: covered by the SSE tests below
        response = await client.request(
            method,
            path,
            headers={"authorization": f"Bearer {TOKEN}"},
            json={} if method == "POST" else None,
        )
        assert response.status_code != 401, (method, path)
        assert response.status_code < 500, (method, path, response.text)


async def test_query_token_is_only_for_event_streams(
    guarded: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    api, client = guarded
    assert (await client.get("/jobs", params={"token": TOKEN})).status_code == 401
    async with SSEStream(api, query={"token": TOKEN}) as stream:
        assert stream.status == 200
    async with SSEStream(api, query={"token": "nope"}) as stream:
        assert stream.status == 401
    async with SSEStream(api, headers={"authorization": f"Bearer {TOKEN}"}) as stream:
        assert stream.status == 200


async def test_a_query_token_is_taken_out_of_the_scope_the_access_log_reads() -> None:
    seen: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["query_string"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = SecurityMiddleware(app, token=TOKEN, limiter=None, max_body_bytes=100)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/events",
        "query_string": f"queue=q&token={TOKEN}".encode(),
        "headers": [],
    }

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    await guard(scope, receive, send)
    assert seen == [b"queue=q"]
    assert scope["query_string"] == b"queue=q"  # uvicorn logs from this very dict


@pytest.mark.parametrize(
    ("query", "headers", "subprotocols"),
    [
        ({"token": TOKEN}, {}, []),
        ({}, {"authorization": f"Bearer {TOKEN}"}, []),
        ({}, {"sec-websocket-protocol": f"bearer, {TOKEN}"}, ["bearer", TOKEN]),
    ],
    ids=["query", "header", "subprotocol"],
)
async def test_websocket_accepts_the_token_three_ways(
    guarded: tuple[FastAPI, httpx.AsyncClient],
    query: dict[str, str],
    headers: dict[str, str],
    subprotocols: list[str],
) -> None:
    api, _ = guarded
    async with WSSession(api, query=query, headers=headers, subprotocols=subprotocols) as ws:
        assert ws.accepted
        assert ws.subprotocol == ("bearer" if subprotocols else None)


@pytest.mark.parametrize("extension", [True, False])
async def test_websocket_without_token_is_refused(
    guarded: tuple[FastAPI, httpx.AsyncClient], extension: bool
) -> None:
    api, _ = guarded
    async with WSSession(api, query={"token": "bad"}, denial_extension=extension) as ws:
        assert not ws.accepted
        if extension:
            assert ws.denied_status == 401
            assert b"bad" not in ws.denied_body
        else:
            assert ws.close_code == 1008


async def test_no_token_is_refused_when_reached_beyond_loopback(build: Build) -> None:
    api, _ = build("memory")
    async with serving(api, base_url="http://10.1.2.3") as client:
        response = await client.get("/jobs")
        assert response.status_code == 403
        assert "CONVEYOR_TOKEN" in response.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 200
    async with serving(api, base_url="http://127.0.0.1") as client:
        assert (await client.get("/jobs")).status_code == 200


def test_binding_beyond_loopback_needs_a_token() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        require_token(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ConfigurationError, match="CONVEYOR_TOKEN"):
            require_token(host, None)
        require_token(host, TOKEN)


def test_serve_refuses_to_start_on_all_interfaces_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.serve", "--host", "0.0.0.0", "--broker", "memory://"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_workers_need_an_app() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.serve", "--workers", "2", "--broker", "memory://"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--workers needs --app" in result.stderr


# -- limits ----------------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after_per_client(build: Build) -> None:
    api, _ = build("memory", rate_limit_per_s=1.0, rate_burst=5)
    async with api.router.lifespan_context(api):
        noisy = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api, client=("10.0.0.1", 1000)), base_url="http://t"
        )
        quiet = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api, client=("10.0.0.2", 1000)), base_url="http://t"
        )
        async with noisy, quiet:
            statuses = [(await noisy.get("/queues")).status_code for _ in range(8)]
            assert statuses[:5] == [200] * 5
            assert statuses[5:] == [429] * 3
            limited = await noisy.get("/queues")
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"]["code"] == "rate_limited"
            assert (await quiet.get("/queues")).status_code == 200
            assert (await noisy.get("/health")).status_code == 200  # probes are never limited


def test_rate_limiter_refills_and_bounds_its_memory() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 2, max_clients=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.5]
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    for key in "bcdef":
        limiter.acquire(key)
    assert len(limiter._buckets) == 3


async def test_body_over_the_cap_is_413_from_content_length(memory_served: Any) -> None:
    cap = memory_served.app.broker.codec.max_payload_bytes + 64 * 1024
    body = b'{"task": "t.x", "args": ["' + b"x" * cap + b'"]}'
    response = await memory_served.client.post(
        "/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    rpc = await memory_served.client.post(
        "/rpc", content=body, headers={"content-type": "application/json"}
    )
    assert rpc.status_code == 413
    assert rpc.json()["error"]["code"] == -32600


async def test_chunked_body_is_cut_off_at_the_cap_without_buffering(memory_served: Any) -> None:
    sent = 0
    chunk = b"x" * (256 * 1024)

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"task": "t.x", "args": ["'
        for _ in range(4096):  # 1 GiB if it were all read
            sent += len(chunk)
            yield chunk

    for path in ("/jobs", "/rpc"):
        sent = 0
        response = await memory_served.client.post(
            path, content=endless(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, path
        assert sent <= 2 * 1024 * 1024


async def test_one_mib_payload_is_accepted_and_one_byte_more_is_413(memory_served: Any) -> None:
    cap = memory_served.app.broker.codec.max_payload_bytes
    # [args, kwargs] encodes as [["<s>"],{}]: 9 bytes of JSON around the string
    fits = "x" * (cap - 9)
    ok = await memory_served.client.post("/jobs", json={"task": "t.x", "args": [fits]})
    assert ok.status_code == 201, ok.text[:300]
    over = await memory_served.client.post("/jobs", json={"task": "t.x", "args": [fits + "x"]})
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "payload_too_large_error"


async def test_rest_body_must_be_json(memory_served: Any) -> None:
    response = await memory_served.client.post(
        "/jobs", content=b"task=t.x", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


# -- broker down -----------------------------------------------------------------------------------


class HangingBroker(MemoryBroker):
    """A memory broker that stops answering reads while ``hang`` is set (a stuck server)."""

    hang = False

    async def get(self, job_id: str) -> Any:
        while self.hang:
            await asyncio.sleep(0.05)
        return await super().get(job_id)

    async def ping(self) -> None:
        while self.hang:
            await asyncio.sleep(0.05)


async def test_a_stuck_broker_gets_503_within_the_timeout_then_fast(build: Build) -> None:
    broker = HangingBroker()
    api = create_app(
        Conveyor(broker=broker),
        settings=ServiceSettings(
            rate_limit_per_s=None,
            broker_timeout_s=0.5,
            breaker_cooldown_s=0.5,
            health_timeout_s=0.2,
        ),
    )
    async with serving(api) as client:
        broker.hang = True
        started = time.monotonic()
        first = await client.get("/jobs/j1")
        assert first.status_code == 503
        assert time.monotonic() - started < 1.0
        assert first.headers["retry-after"] == "1"
        assert first.json()["error"]["code"] == "broker_unavailable"
        started = time.monotonic()
        fast = await client.get("/jobs/j1")
        assert fast.status_code == 503
        assert time.monotonic() - started < 0.1  # the breaker answers without waiting
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["broker"]["circuit"] == "open"
        broker.hang = False
        await asyncio.sleep(0.6)
        last = await client.get("/jobs/j1")
        assert last.status_code == 404, last.text


@pytest.mark.redis
async def test_redis_down_gives_503_fast_and_recovers() -> None:
    if redis_server_binary() is None:
        if os.environ.get("CONVEYOR_REQUIRE_REDIS") == "1":
            pytest.fail("CONVEYOR_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    server = RedisServer()  # a dedicated one: this test stops it
    server.start()
    try:
        api = create_app(url=server.url, settings=TEST_SETTINGS)
        async with serving(api) as client:
            assert (await client.post("/jobs", json={"task": "t.x"})).status_code == 201
            server.stop()
            for path in ("/jobs", "/rpc"):
                started = time.monotonic()
                if path == "/jobs":
                    response = await client.post(path, json={"task": "t.x"})
                    assert response.status_code == 503, response.text
                    assert "retry-after" in response.headers
                else:
                    response = await client.post(
                        path, json={"jsonrpc": "2.0", "method": "queue_counts", "id": 1}
                    )
                    assert response.json()["error"]["code"] == -32010
                assert time.monotonic() - started < 2.5
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json()["broker"]["reachable"] is False
            server.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                response = await client.post("/jobs", json={"task": "t.x"})
                if response.status_code == 201:
                    break
                await asyncio.sleep(0.2)
            assert response.status_code == 201
            assert (await client.get("/health")).status_code == 200
    finally:
        server.close()
