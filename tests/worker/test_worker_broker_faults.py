"""Broker faults: the worker rides out a Redis restart under load and resumes by itself."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pytest
from worker_helpers import eventually, running

from conveyor import Conveyor, JobState
from conveyor.errors import BrokerUnavailable, InvalidJobError
from conveyor.testing import RedisServer, redis_server_binary

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
]


async def _produce(app: Conveyor, total: int, acked: list[str]) -> int:
    """Enqueue ``total`` jobs in batches of 10 at ~500/s, retrying through an outage.

    A batch whose reply was lost is retried with the same ids; "already in use" then means the
    first try was stored, so it counts as acknowledged. Returns the number of retried batches.
    """
    retries = 0
    for start in range(0, total, 10):
        batch = [
            app.request("t.load", args=[i], job_id=f"job-{i}") for i in range(start, start + 10)
        ]
        while True:
            try:
                await app.enqueue_many(batch)
            except BrokerUnavailable:
                retries += 1
                await asyncio.sleep(0.1)
                continue
            except InvalidJobError as exc:
                if "already in use" not in str(exc):
                    raise
            break
        acked.extend(r.job.id for r in batch)
        await asyncio.sleep(0.02)
    return retries


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_restarting_redis_under_load_loses_nothing_and_the_worker_resumes_by_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer(appendfsync="always")
    server.start()
    caplog.set_level(logging.INFO, logger="conveyor.worker")
    try:
        app = Conveyor(server.url)
        runs: Counter[int] = Counter()
        finished_at: list[float] = []

        @app.task(name="t.load")
        async def load(i: int) -> int:
            runs[i] += 1
            await asyncio.sleep(0.005)
            finished_at.append(time.monotonic())
            return i

        async with app:
            async with running(app, lease_s=10, heartbeat_s=0.5, scan_interval_s=1) as worker:
                acked: list[str] = []
                producer = asyncio.create_task(_produce(app, 1500, acked))
                await eventually(lambda: len(finished_at) > 200, timeout_s=10)

                await asyncio.to_thread(server.stop)
                saw_open = await eventually(
                    lambda: worker.health()["circuit"] == "open", timeout_s=5
                )
                await asyncio.sleep(2.0)
                assert worker.health()["healthy"] is False
                await asyncio.to_thread(server.start)
                restarted = time.monotonic()

                await eventually(lambda: finished_at[-1] > restarted, timeout_s=10)
                resumed_s = min(t for t in finished_at if t > restarted) - restarted
                async with asyncio.timeout(30):
                    retried_batches = await producer
                await eventually(
                    lambda: _completed(app, acked), timeout_s=30, what="all jobs completed"
                )
                await eventually(lambda: worker.health()["healthy"], timeout_s=5)
            jobs = [await app.get_job(i) for i in acked]
    finally:
        server.close()

    print(
        f"\nRedis restart under load: resumed {resumed_s:.2f} s after Redis returned; "
        f"{retried_batches} enqueue batches retried; "
        f"{sum(1 for n in runs.values() if n > 1)} jobs ran twice"
    )
    assert saw_open
    assert len(acked) == 1500
    lost = [j for j in jobs if j is None or j.state is not JobState.COMPLETED]
    assert lost == []
    assert resumed_s < 5.0
    assert set(runs) == set(range(1500))
    # One log line per state change per loop, not one per failed call.
    opened = Counter(
        getattr(r, "loop", None)
        for r in caplog.records
        if getattr(r, "action", "") == "circuit_open"
    )
    assert opened, "the outage was not logged"
    assert max(opened.values()) <= 2, opened


async def _completed(app: Conveyor, ids: list[str]) -> bool:
    counts = await app.counts("default")
    return counts["default"][JobState.COMPLETED] == len(ids)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_an_outcome_is_kept_through_an_outage_and_written_when_the_broker_returns() -> None:
    server = RedisServer(appendfsync="always")
    server.start()
    try:
        app = Conveyor(server.url)
        go = asyncio.Event()
        begun = asyncio.Event()

        @app.task(name="t.waits")
        async def waits() -> str:
            begun.set()
            await go.wait()
            return "kept"

        async with app:
            handle = await app.enqueue("t.waits")
            async with running(app, lease_s=10, heartbeat_s=0.5) as worker:
                await begun.wait()
                await asyncio.to_thread(server.stop)
                go.set()  # the run ends while the broker is unreachable
                await eventually(lambda: worker.health()["circuit"] == "open", timeout_s=5)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(server.start)
                await eventually(lambda: _state(app, handle.id, JobState.COMPLETED), timeout_s=10)
            job = await app.get_job(handle.id)
    finally:
        server.close()
    assert job is not None
    assert job.result == "kept"
    assert job.attempts == 1
    assert worker.metrics.totals()["completed"] == 1


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_stopping_while_the_broker_is_down_is_bounded() -> None:
    server = RedisServer()
    server.start()
    try:
        app = Conveyor(server.url)
        begun = asyncio.Event()

        @app.task(name="t.stuck")
        async def stuck() -> None:
            begun.set()
            await asyncio.sleep(60)

        async with app:
            await app.enqueue("t.stuck")
            worker = await _started(app, grace_period_s=1.0)
            await begun.wait()
            await asyncio.to_thread(server.kill)
            t0 = time.monotonic()
            async with asyncio.timeout(20):
                await worker.stop()
            took = time.monotonic() - t0
    finally:
        server.close()
    print(f"\nstop with Redis down, grace 1 s: {took:.2f} s")
    assert took < 1.0 + 5.0
    assert worker.state == "stopped"


async def _started(app: Conveyor, **options: Any) -> Any:
    from conveyor.worker import Worker

    worker = Worker(app, lease_s=5, heartbeat_s=0.2, **options)
    await worker.start()
    return worker


async def _state(app: Conveyor, job_id: str, state: JobState) -> bool:
    try:
        job = await app.get_job(job_id)
    except BrokerUnavailable:
        return False
    return job is not None and job.state is state


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_worker_started_while_the_broker_is_down_consumes_once_it_is_up() -> None:
    server = RedisServer()  # not started yet: its port refuses connections
    try:
        app = Conveyor(server.url)

        @app.task(name="t.late_broker")
        async def late_broker() -> str:
            return "finally"

        worker = await _started(app)
        try:
            await asyncio.sleep(0.5)
            health = worker.health()
            assert health["healthy"] is False
            assert health["circuit"] == "open"
            await asyncio.to_thread(server.start)
            up = time.monotonic()
            handle = await app.enqueue("t.late_broker")
            await eventually(lambda: _state(app, handle.id, JobState.COMPLETED), timeout_s=10)
            consumed_s = time.monotonic() - up
            await eventually(lambda: worker.health()["healthy"], timeout_s=5)
        finally:
            await worker.stop()
            await app.close()
    finally:
        server.close()
    print(f"\nbroker down at start: consuming {consumed_s:.2f} s after it came up")
    assert consumed_s < 5.0
