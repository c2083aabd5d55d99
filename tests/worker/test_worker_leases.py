"""Leases: renewal, revocation (cancel, delete, expiry) stopping runs, and a blocked event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import worker_tasks
from worker_helpers import eventually, finished, running

from conveyor import Conveyor, JobContext, JobState
from conveyor.brokers import open_broker
from conveyor.clock import FakeClock
from conveyor.worker import Worker


async def _cancel_and_time(app: Conveyor, job_id: str, stopped: threading.Event) -> float:
    t0 = time.monotonic()
    await app.cancel(job_id)
    await asyncio.to_thread(stopped.wait, 5.0)
    assert stopped.is_set(), "the run was not stopped"
    return time.monotonic() - t0


async def test_cancel_stops_a_running_async_job_within_a_second(app_url: str) -> None:
    app = Conveyor(app_url)
    begun = asyncio.Event()
    stopped = threading.Event()

    @app.task(name="t.async_long")
    async def async_long() -> None:
        begun.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    async with app:
        handle = await async_long.enqueue()
        async with running(app, heartbeat_s=Worker.DEFAULT_HEARTBEAT_S) as worker:
            await begun.wait()
            took = await _cancel_and_time(app, handle.id, stopped)
            await eventually(lambda: worker.health()["running"] == 0)
        job = await handle.status()
    assert took < 1.0
    assert job.state is JobState.STOPPED
    assert job.attempts == 0  # nothing charged, nothing retried
    assert worker.metrics.totals()["cancelled"] == 1
    assert worker.metrics.totals()["retried"] == 0


async def test_cancel_stops_a_running_thread_job_within_a_second(app_url: str) -> None:
    app = Conveyor(app_url)
    begun = threading.Event()
    stopped = threading.Event()

    @app.task(name="t.thread_long", executor="thread")
    def thread_long(ctx: JobContext) -> None:
        begun.set()
        if ctx.wait_cancelled(30):
            stopped.set()

    async with app:
        handle = await thread_long.enqueue()
        async with running(app, heartbeat_s=Worker.DEFAULT_HEARTBEAT_S) as worker:
            await asyncio.to_thread(begun.wait, 5)
            took = await _cancel_and_time(app, handle.id, stopped)
            await eventually(lambda: worker.health()["running"] == 0)
        job = await handle.status()
    assert took < 1.0
    assert job.state is JobState.STOPPED
    assert job.attempts == 0


def _process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, not yet reaped


async def test_cancel_stops_a_running_process_job_within_a_second(
    url_for: Any, tmp_path: Path
) -> None:
    app = Conveyor(url_for("sqlite"))
    proc_wait = app.task(name="t.proc_wait", executor="process")(worker_tasks.proc_wait)
    pid_file = tmp_path / "pid"

    async with app:
        handle = await proc_wait.enqueue(str(pid_file), 60)
        async with running(app, heartbeat_s=Worker.DEFAULT_HEARTBEAT_S, concurrency={"process": 1}):
            await eventually(pid_file.exists, timeout_s=20, what="the child started")
            await eventually(lambda: pid_file.read_text(), what="the pid written")
            pid = int(pid_file.read_text())
            t0 = time.monotonic()
            await app.cancel(handle.id)
            await eventually(lambda: _process_gone(pid), timeout_s=5, what="the child stopped")
            took = time.monotonic() - t0
        job = await handle.status()
    assert took < 1.0
    assert job.state is JobState.STOPPED
    assert job.attempts == 0


async def test_deleting_a_running_job_stops_its_run(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    begun = asyncio.Event()
    stopped = threading.Event()

    @app.task(name="t.deleted")
    async def deleted() -> None:
        begun.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    async with app:
        handle = await deleted.enqueue()
        async with running(app):
            await begun.wait()
            await app.delete(handle.id)
            await asyncio.to_thread(stopped.wait, 2)
        assert stopped.is_set()
        assert await app.get_job(handle.id) is None


async def test_the_heartbeat_keeps_a_job_running_longer_than_its_lease(app_url: str) -> None:
    app = Conveyor(app_url)
    runs: list[str] = []

    @app.task(name="t.longer_than_lease")
    async def longer(ctx: JobContext) -> str:
        runs.append(ctx.job_id)
        await asyncio.sleep(1.5)
        return "kept"

    async with app:
        handle = await longer.enqueue()
        async with running(app, lease_s=0.5, heartbeat_s=0.1, scan_interval_s=0.1) as worker:
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.COMPLETED
    assert job.attempts == 1
    assert runs == [handle.id]
    assert worker.metrics.totals()["lease_expirations"] == 0


async def test_a_run_whose_lease_expired_is_stopped_and_its_outcome_dropped() -> None:
    clock = FakeClock(start_ms=int(time.time() * 1000))
    app = Conveyor("memory://", clock=clock)
    begun = asyncio.Event()
    cancelled: list[int] = []

    @app.task(name="t.stalled")
    async def stalled(ctx: JobContext) -> int:
        begun.set()
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(ctx.attempt)
                raise
        return ctx.attempt

    async with app:
        handle = await stalled.enqueue()
        # A long scan interval: only this test recovers the lease, as a peer worker would.
        async with running(app, lease_s=2, heartbeat_s=0.1, scan_interval_s=60):
            await begun.wait()
            clock.advance(3)
            report = await app.broker.requeue_expired("default")
            assert report.requeued == [handle.id]
            (job,) = await finished(app, [handle.id])
            # The stale first run is stopped by its own lost lease, even though this worker
            # holds the same job again under a new lease.
            await eventually(lambda: cancelled == [1], timeout_s=2, what="the stale run stopped")
    assert cancelled == [1]
    assert job.state is JobState.COMPLETED
    assert job.result == 2  # the second delivery's outcome; the first was never stored
    assert job.attempts == 2


def _peer_reaper(url: str, queue: str, stop: threading.Event, found: list[str]) -> None:
    """Another worker's reaper, in its own thread and loop (the test's loop will be blocked)."""

    async def scan() -> None:
        broker = open_broker(url)
        await broker.connect()
        try:
            while not stop.is_set():
                report = await broker.requeue_expired(queue)
                found.extend(report.requeued + report.dead_lettered)
                await asyncio.sleep(0.05)
        finally:
            await broker.close()

    asyncio.run(scan())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_job_blocking_the_loop_for_three_leases_is_not_redelivered(
    url_for: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = url_for(kind)
    app = Conveyor(url)
    lease_s = 1.0
    runs: list[int] = []

    @app.task(name="t.blocker")
    async def blocker(ctx: JobContext) -> str:
        runs.append(ctx.attempt)
        time.sleep(3 * lease_s)  # blocks the event loop: the very thing not to do
        return "survived"

    stop = threading.Event()
    recovered: list[str] = []
    peer = threading.Thread(target=_peer_reaper, args=(url, "default", stop, recovered))
    caplog.set_level(logging.WARNING, logger="conveyor.worker.heartbeat")
    async with app:
        handle = await blocker.enqueue()
        peer.start()
        try:
            async with running(app, lease_s=lease_s, heartbeat_s=0.2, scan_interval_s=0.2) as w:
                (job,) = await finished(app, [handle.id], timeout_s=15)
        finally:
            stop.set()
            await asyncio.to_thread(peer.join, 5)
    assert recovered == []  # the peer never saw the lease expire
    assert job.state is JobState.COMPLETED
    assert job.attempts == 1
    assert runs == [1]
    assert w.metrics.totals()["lease_expirations"] == 0
    assert any("event loop has been blocked" in r.getMessage() for r in caplog.records)


async def test_a_job_of_a_dead_worker_runs_again_after_its_lease(url_for: Any) -> None:
    app = Conveyor(url_for("sqlite"))

    @app.task(name="t.orphan")
    async def orphan(ctx: JobContext) -> int:
        return ctx.attempt

    async with app:
        handle = await orphan.enqueue()
        # A worker that reserved the job and died: nobody renews its lease.
        (taken,) = await app.broker.reserve("default", 1, lease_s=0.5, worker_id="dead")
        assert taken.id == handle.id
        async with running(app, lease_s=2, scan_interval_s=0.1) as worker:
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.COMPLETED
    assert job.result == 2
    assert job.attempts == 2  # the lost lease was charged
    assert worker.metrics.totals()["lease_expirations"] == 1
