"""Worker lifecycle: start, stop (graceful, immediate, idempotent), burst mode, capacity, health."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest
from worker_helpers import eventually, finished, running, state_of

from conveyor import Conveyor, JobState, RetryPolicy
from conveyor.errors import ConfigurationError
from conveyor.worker import Worker


async def test_default_queues_are_those_of_the_registered_tasks(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.a", queue="alpha")
    async def a() -> None: ...

    @app.task(name="t.b", queue="beta", executor="thread")
    def b() -> None: ...

    worker = Worker(app)
    assert worker.queues == ["alpha", "beta"]
    assert worker.kinds == ["async", "thread"]
    assert worker.queue_kinds == {"alpha": ["async"], "beta": ["thread"]}
    assert Worker(Conveyor(url_for("memory"))).queues == ["default"]


def test_bad_options_are_refused_with_a_clear_error() -> None:
    app = Conveyor("memory://")
    with pytest.raises(ConfigurationError, match="heartbeat_s"):
        Worker(app, lease_s=1, heartbeat_s=2)
    with pytest.raises(ConfigurationError, match="concurrency"):
        Worker(app, concurrency={"gpu": 3})
    with pytest.raises(ConfigurationError, match="lease_s"):
        Worker(app, lease_s=0)
    with pytest.raises(ConfigurationError, match="process_nice must be an integer from 0"):
        Worker(app, process_nice=20)


async def test_stop_is_idempotent_and_returns_the_same_awaitable(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    async with app:
        worker = Worker(app)
        await worker.start()
        assert worker.state == "running"
        first = worker.stop()
        second = worker.stop()
        assert first is second
        await first
        await second
        assert worker.state == "stopped"
        assert worker.stop() is first
        await worker.stop()


async def test_a_worker_never_started_stops_at_once(url_for: Any) -> None:
    worker = Worker(Conveyor(url_for("memory")))
    await worker.stop()
    assert worker.state == "stopped"
    with pytest.raises(ConfigurationError, match="starts once"):
        await worker.start()


async def test_stop_with_an_empty_queue_is_prompt(app_url: str) -> None:
    app = Conveyor(app_url)

    @app.task(name="t.idle")
    async def idle() -> None: ...

    async with app:
        worker = Worker(app)
        await worker.start()
        await asyncio.sleep(0.2)  # let the fetcher block on the broker
        started = time.monotonic()
        await worker.stop()
        assert time.monotonic() - started < 1.0


async def test_graceful_stop_lets_running_jobs_finish(app_url: str) -> None:
    app = Conveyor(app_url)
    begun = asyncio.Event()

    @app.task(name="t.short")
    async def short() -> str:
        begun.set()
        await asyncio.sleep(0.3)
        return "finished"

    async with app:
        handles = await app.enqueue_many([short.request() for _ in range(3)])
        worker = Worker(app, heartbeat_s=0.1, grace_period_s=5)
        await worker.start()
        await begun.wait()
        await worker.stop()
        jobs = [await app.get_job(h.id) for h in handles]
    assert [j.state for j in jobs if j] == [JobState.COMPLETED] * 3


async def test_stop_after_the_grace_period_releases_jobs_without_charging_an_attempt(
    app_url: str,
) -> None:
    app = Conveyor(app_url)
    started: list[str] = []
    cancelled: list[str] = []

    @app.task(name="t.long")
    async def long(ctx: Any) -> None:
        started.append(ctx.job_id)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(ctx.job_id)
            raise

    async with app:
        handles = await app.enqueue_many([long.request() for _ in range(8)])
        worker = Worker(app, concurrency={"async": 5}, heartbeat_s=0.1, grace_period_s=0.3)
        await worker.start()
        await eventually(lambda: len(started) == 5, what="5 jobs running")
        t0 = time.monotonic()
        await worker.stop()
        elapsed = time.monotonic() - t0
        jobs = [await app.get_job(h.id) for h in handles]
    assert elapsed < 0.3 + 3.0
    assert sorted(cancelled) == sorted(started)
    assert all(j is not None and j.state is JobState.QUEUED for j in jobs)
    assert all(j is not None and j.attempts == 0 for j in jobs)  # release charges nothing
    assert worker.metrics.totals()["released"] == 5


async def test_a_second_stop_with_no_grace_cancels_at_once(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    begun = asyncio.Event()

    @app.task(name="t.forever")
    async def forever() -> None:
        begun.set()
        await asyncio.sleep(60)

    async with app:
        handle = await forever.enqueue()
        worker = Worker(app, grace_period_s=30)
        await worker.start()
        await begun.wait()
        closing = worker.stop()
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        assert worker.stop(grace_period_s=0) is closing
        await closing
        assert time.monotonic() - t0 < 1.0
        assert await state_of(app, handle.id) is JobState.QUEUED


async def test_async_context_manager_starts_and_stops(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.ctx")
    async def ctx_task() -> int:
        return 1

    async with app:
        handle = await ctx_task.enqueue()
        async with Worker(app) as worker:
            assert worker.state == "running"
            await finished(app, [handle.id])
        assert worker.state == "stopped"


async def test_burst_mode_exits_when_the_queues_are_drained(app_url: str) -> None:
    app = Conveyor(app_url)

    @app.task(name="t.quick")
    async def quick(i: int) -> int:
        await asyncio.sleep(0.001)
        return i

    async with app:
        handles = await app.enqueue_many([quick.request(i) for i in range(200)])
        later = await quick.options_for_call(delay_s=60).enqueue(-1)  # not due: not waited for
        worker = Worker(app, burst=True)
        async with asyncio.timeout(20):
            await worker.run()
        states = {await state_of(app, h.id) for h in handles}
        assert states == {JobState.COMPLETED}
        assert await state_of(app, later.id) is JobState.SCHEDULED
    assert worker.state == "stopped"


async def test_burst_mode_waits_for_retries_in_backoff_before_it_exits(app_url: str) -> None:
    app = Conveyor(app_url)
    runs: list[float] = []

    @app.task(name="t.flaky", retry=RetryPolicy.fixed(0.3, max_attempts=3))
    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) < 3:
            raise ValueError("not yet")

    async with app:
        handle = await flaky.enqueue()
        worker = Worker(app, burst=True, scan_interval_s=0.1)
        async with asyncio.timeout(20):
            await worker.run()
        assert await state_of(app, handle.id) is JobState.COMPLETED
    assert len(runs) == 3
    assert runs[2] - runs[0] >= 0.55  # it waited out both backoffs (no early exit, no skip)


async def test_burst_mode_does_not_wait_for_a_retry_beyond_burst_wait_s(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.later", retry=RetryPolicy.fixed(30, max_attempts=3))
    async def later() -> None:
        raise ValueError("try again in 30 s")

    async with app:
        handle = await later.enqueue()
        started = time.monotonic()
        async with asyncio.timeout(10):
            await Worker(app, burst=True, burst_wait_s=5).run()
        assert time.monotonic() - started < 3
        assert await state_of(app, handle.id) is JobState.SCHEDULED


async def test_burst_mode_on_an_empty_queue_exits_at_once(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    async with app:
        async with asyncio.timeout(2):
            await Worker(app, burst=True).run()


async def test_the_fetcher_reserves_only_what_free_slots_can_run(app_url: str) -> None:
    app = Conveyor(app_url)
    now_running = 0
    peak = 0
    broker_peak = 0

    @app.task(name="t.busy")
    async def busy() -> None:
        nonlocal now_running, peak
        now_running += 1
        peak = max(peak, now_running)
        await asyncio.sleep(0.05)
        now_running -= 1

    async with app:
        handles = await app.enqueue_many([busy.request() for _ in range(30)])
        async with running(app, concurrency={"async": 3}):

            async def sample() -> None:
                nonlocal broker_peak
                while True:
                    counts = await app.counts("default")
                    broker_peak = max(broker_peak, counts["default"][JobState.RUNNING])
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            await finished(app, [h.id for h in handles], timeout_s=20)
            sampler.cancel()
    assert peak == 3
    # Reserved in the broker is never more than what can run: never fetch-then-requeue.
    assert broker_peak <= 3


async def test_health_reports_a_consuming_worker(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    async with app:
        async with running(app) as worker:
            await eventually(lambda: worker.health()["last_reserve_ms"] > 0)
            health = worker.health()
            assert health["state"] == "running"
            assert health["healthy"] is True
            assert health["consuming"] is True
            assert health["circuit"] == "closed"
            assert health["running"] == 0
            assert set(health["circuits"]) == {"fetcher", "reaper", "committer", "heartbeat"}
        assert worker.health()["consuming"] is False


async def test_a_loop_that_dies_stops_the_worker_loudly(
    url_for: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = Conveyor(url_for("memory"))

    async def broken_reserve(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("reserve exploded")

    async with app:
        monkeypatch.setattr(app.broker, "reserve", broken_reserve)
        worker = Worker(app)
        with pytest.raises(RuntimeError, match="reserve exploded"):
            async with asyncio.timeout(5):
                await worker.run()
    assert worker.state == "stopped"
    assert any("fetcher loop died" in r.getMessage() for r in caplog.records)


async def test_signals_stop_gracefully_then_immediately(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    begun = asyncio.Event()

    @app.task(name="t.sig")
    async def sig_task() -> None:
        begun.set()
        await asyncio.sleep(60)

    async with app:
        handle = await sig_task.enqueue()
        worker = Worker(app, grace_period_s=30, install_signals=True)
        await worker.start()
        await begun.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await eventually(lambda: worker.state == "stopping")
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
        async with asyncio.timeout(3):
            await worker.wait_closed()
        assert time.monotonic() - t0 < 1.5
        assert await state_of(app, handle.id) is JobState.QUEUED
    # The defaults are back: the loop no longer handles these signals.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_jobs_reserved_by_the_last_fetch_of_a_shutdown_are_released_not_run(
    url_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Conveyor(url_for("memory"))
    ran: list[int] = []

    @app.task(name="t.late")
    async def late(i: int) -> None:
        ran.append(i)

    in_reserve = asyncio.Event()
    proceed = asyncio.Event()
    real_reserve = app.broker.reserve

    async def slow_reserve(*args: Any, **kwargs: Any) -> Any:
        in_reserve.set()
        await proceed.wait()  # the reserve is in flight when the stop comes
        return await real_reserve(*args, **kwargs)

    async with app:
        monkeypatch.setattr(app.broker, "reserve", slow_reserve)
        worker = Worker(app, grace_period_s=30)
        await worker.start()
        await in_reserve.wait()
        handles = await app.enqueue_many([late.request(i) for i in range(3)])
        closing = worker.stop()
        await asyncio.sleep(0)
        proceed.set()
        t0 = time.monotonic()
        await closing
        took = time.monotonic() - t0
        jobs = [await app.get_job(h.id) for h in handles]
    assert ran == []
    assert took < 1.0  # parked jobs do not hold up the 30 s grace wait
    assert {j.state for j in jobs if j} == {JobState.QUEUED}
    assert {j.attempts for j in jobs if j} == {0}
    assert worker.metrics.totals()["released"] == 3


async def test_stop_is_bounded_when_jobs_ignore_cancellation(url_for: Any) -> None:
    app = Conveyor(url_for("sqlite"))
    release = threading.Event()
    started = threading.Event()
    swallowed = asyncio.Event()

    @app.task(name="t.deaf_thread", executor="thread")
    def deaf_thread() -> None:
        started.set()
        release.wait(30)  # never looks at ctx.cancelled

    @app.task(name="t.deaf_async")
    async def deaf_async() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed.set()  # and carries on: a badly behaved job

    async with app:
        h1 = await deaf_thread.enqueue()
        h2 = await deaf_async.enqueue()
        worker = Worker(app, heartbeat_s=0.1, grace_period_s=0.5)
        await worker.start()
        await asyncio.to_thread(started.wait, 5)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(10):
                await worker.stop()
            took = time.monotonic() - t0
        finally:
            release.set()
        assert swallowed.is_set()
        assert took < 0.5 + 5.0
        # Both were given back (released) even though their code kept running.
        assert await state_of(app, h1.id) is JobState.QUEUED
        assert await state_of(app, h2.id) is JobState.QUEUED


async def test_cancelling_run_stops_the_worker_gracefully(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    begun = asyncio.Event()

    @app.task(name="t.cancel_run")
    async def cancel_run() -> None:
        begun.set()
        await asyncio.sleep(60)

    async with app:
        handle = await cancel_run.enqueue()
        worker = Worker(app, grace_period_s=0.2)
        runner = asyncio.create_task(worker.run())
        await begun.wait()
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert worker.state == "stopped"
        assert await state_of(app, handle.id) is JobState.QUEUED


def test_a_worker_abandoned_by_asyncio_run_still_releases_its_jobs(url_for: Any) -> None:
    """``asyncio.run`` cancels every task at exit: the worker gives its jobs back on the way out."""
    url = url_for("sqlite")
    begun = threading.Event()

    async def main() -> str:
        app = Conveyor(url)

        @app.task(name="t.abandoned")
        async def abandoned() -> None:
            begun.set()
            await asyncio.sleep(60)

        await app.connect()
        handle = await abandoned.enqueue()
        worker = Worker(app, grace_period_s=30)
        await worker.start()
        while not begun.is_set():
            await asyncio.sleep(0.01)
        return handle.id  # returns with the worker still running

    job_id = asyncio.run(main())

    async def check() -> Any:
        async with Conveyor(url) as app:
            return await app.get_job(job_id)

    job = asyncio.run(check())
    assert job.state is JobState.QUEUED
    assert job.attempts == 0


async def test_named_executors_run_tasks_registered_after_the_worker_was_built() -> None:
    app = Conveyor("memory://")
    with pytest.raises(ConfigurationError, match="executors"):
        Worker(app, executors=["gpu"])
    async with app:
        worker = Worker(app, queues=["late"], executors=["async", "thread"], heartbeat_s=0.1)
        assert worker.queue_kinds == {"late": ["async", "thread"]}
        async with worker:

            @app.task(name="t.late_sync", queue="late", executor="thread")
            def late_sync(x: int) -> int:
                return x * 2

            handle = await late_sync.enqueue(21)
            assert await handle.result(timeout_s=10) == 42
