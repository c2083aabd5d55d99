"""/health and /metrics: liveness while workers are busy (real uvicorn), worker verdicts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.client import Conveyor
from conveyor.service import ServiceSettings, create_app

from .conftest import TEST_SETTINGS, LiveServer, serving

BLOCK_S = 1.5


def _blocking_app() -> Conveyor:
    app = Conveyor("memory://")

    @app.task(name="t.block", executor="thread")
    def block() -> str:
        time.sleep(BLOCK_S)  # a sync job holding a pool thread (and, at times, the GIL)
        return "done"

    return app


def _latencies(url: str, n: int = 20) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(n):
            started = time.perf_counter()
            response = client.get("/health")
            out.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return out


def test_health_answers_within_100ms_while_every_worker_thread_is_busy(
    live_server: Callable[[FastAPI], LiveServer],
) -> None:
    api = create_app(_blocking_app(), workers=1, settings=TEST_SETTINGS)

    @api.get("/slow-sync")
    def slow_sync() -> dict[str, str]:
        time.sleep(BLOCK_S)  # a handler blocking a threadpool thread
        return {}

    async def slow_dependency() -> None:
        await asyncio.sleep(BLOCK_S)

    @api.get("/slow-async", dependencies=[__import__("fastapi").Depends(slow_dependency)])
    async def slow_async() -> dict[str, str]:
        return {}

    server = live_server(api)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        batch = [{"task": "t.block"} for _ in range(16)]
        assert client.post("/jobs", json=batch).status_code == 201
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            running = client.get("/jobs", params={"state": "running"}).json()["jobs"]
            if len(running) >= 8:
                break
            time.sleep(0.05)
        assert len(running) >= 8, "the thread pool never filled up"
        slow = [
            threading.Thread(
                target=httpx.get, args=(f"{server.url}{path}",), kwargs={"timeout": 10}
            )
            for path in ("/slow-sync", "/slow-async") * 4
        ]
        for thread in slow:
            thread.start()
        time.sleep(0.1)
        latencies = _latencies(server.url)
        report = client.get("/health").json()
        for thread in slow:
            thread.join(10)
    assert max(latencies) < 0.1, f"slowest /health took {max(latencies) * 1000:.0f} ms"
    assert report["workers"][0]["healthy"] is True
    assert report["workers"][0]["running"] >= 8


def test_metrics_include_the_workers(live_server: Callable[[FastAPI], LiveServer]) -> None:
    app = Conveyor("memory://")

    @app.task(name="t.quick")
    async def quick() -> int:
        return 1

    server = live_server(create_app(app, workers=2, settings=TEST_SETTINGS))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        job_id = client.post("/jobs", json={"task": "t.quick"}).json()["job_id"]
        deadline = time.monotonic() + 5
        while client.get(f"/jobs/{job_id}").json()["state"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = client.get("/metrics").text
    assert 'conveyor_jobs_completed_total{queue="default",task="t.quick",worker="' in text
    assert text.count("# TYPE conveyor_jobs_completed_total counter") == 1


class _FakeWorker:
    def __init__(self, report: dict[str, Any] | Exception) -> None:
        self.report = report

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health(self) -> dict[str, Any]:
        if isinstance(self.report, Exception):
            raise self.report
        return self.report


@pytest.mark.parametrize(
    ("report", "status"),
    [
        ({"healthy": True, "state": "running"}, 200),
        ({"healthy": False, "state": "running", "circuit": "open"}, 503),
        ({"status": "stopped"}, 503),
        (RuntimeError("boom"), 503),
    ],
)
async def test_a_worker_that_stopped_consuming_makes_health_503(
    report: dict[str, Any] | Exception, status: int
) -> None:
    api = create_app(
        url="memory://",
        workers=1,
        settings=TEST_SETTINGS,
        worker_factory=lambda app: _FakeWorker(report),
    )
    async with serving(api) as client:
        response = await client.get("/health")
    assert response.status_code == status
    body = response.json()
    assert body["status"] == ("unavailable" if status == 503 else body["status"])
    assert "Traceback" not in response.text


async def test_a_blocked_loop_shows_as_lag() -> None:
    api = create_app(url="memory://", settings=ServiceSettings(rate_limit_per_s=None))
    async with serving(api) as client:
        await asyncio.sleep(0.3)
        time.sleep(0.8)  # block the loop on purpose, as a misbehaving async task would
        await asyncio.sleep(0.3)
        report = (await client.get("/health")).json()
    assert report["loop_lag_ms"] > 500
    assert any("loop lag" in p for p in report["problems"])
