"""Service fixtures: the real app with its lifespan running, on every broker, driven over ASGI."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.brokers.base import Broker
from conveyor.client import Conveyor
from conveyor.service import ServiceSettings, create_app
from conveyor.service.operations import Service
from conveyor.testing.redis_server import free_port

#: No rate limit (tests send bursts from one address); everything else at its default.
TEST_SETTINGS = ServiceSettings(rate_limit_per_s=None)


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_app falls back to $CONVEYOR_TOKEN: tests decide about auth themselves."""
    monkeypatch.delenv("CONVEYOR_TOKEN", raising=False)


@dataclass
class Served:
    """The app under test and an httpx client bound to it."""

    api: FastAPI
    client: httpx.AsyncClient
    app: Conveyor

    @property
    def service(self) -> Service:
        service: Service = self.api.state.service
        return service

    @property
    def broker(self) -> Broker:
        return self.app.broker


@asynccontextmanager
async def serving(api: FastAPI, **client_options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``api``'s lifespan and yield a client that talks to it in this loop."""
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        options = {"base_url": "http://testserver", **client_options}
        async with httpx.AsyncClient(transport=transport, **options) as client:
            yield client


@pytest.fixture
def build(make_broker: Callable[..., Broker]) -> Callable[..., tuple[FastAPI, Conveyor]]:
    """``build(kind, **settings)``: an app on a fresh broker of ``kind`` (not started)."""

    def make(kind: str, *, token: str | None = None, **settings: Any) -> tuple[FastAPI, Conveyor]:
        app = Conveyor(broker=make_broker(kind))
        api = create_app(app, token=token, settings=replace(TEST_SETTINGS, **settings))
        return api, app

    return make


@pytest.fixture
async def served(
    broker_kind: str, build: Callable[..., tuple[FastAPI, Conveyor]]
) -> AsyncIterator[Served]:
    """The service on each broker kind, lifespan running."""
    api, app = build(broker_kind)
    async with serving(api) as client:
        yield Served(api, client, app)


@pytest.fixture
async def memory_served(build: Callable[..., tuple[FastAPI, Conveyor]]) -> AsyncIterator[Served]:
    """The service on the memory broker (for tests about the HTTP layer, not the broker)."""
    api, app = build("memory")
    async with serving(api) as client:
        yield Served(api, client, app)


@dataclass
class LiveServer:
    """uvicorn serving an app for real on a free loopback port, in a background thread."""

    api: FastAPI
    url: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        """Run a coroutine on the server's loop (where a memory broker lives); its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@pytest.fixture
def live_server() -> Iterator[Callable[[FastAPI], LiveServer]]:
    """``live_server(api)``: start uvicorn for ``api``; stopped at the end of the test."""
    import uvicorn

    started: list[tuple[uvicorn.Server, threading.Thread, asyncio.AbstractEventLoop]] = []

    def start(api: FastAPI) -> LiveServer:
        port = free_port()
        config = uvicorn.Config(
            api, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_until_complete, args=(server.serve(),), daemon=True
        )
        thread.start()
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.025)
        assert server.started, "uvicorn did not start within 5 s"
        started.append((server, thread, loop))
        return LiveServer(api, f"http://127.0.0.1:{port}", loop)

    yield start
    for server, thread, loop in started:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop within 10 s"
        loop.close()
