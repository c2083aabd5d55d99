"""SQLite-specific behaviour: wake-ups across instances, trims, the database thread, dedup rules."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.brokers.base import JobEvent
from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.clock import FakeClock
from conveyor.job import FailureReason, Job, JobState, new_job_id


def _job(**fields: object) -> Job:
    fields.setdefault("queue", "q")
    return Job(id=new_job_id(), task="tests.noop", **fields)  # type: ignore[arg-type]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SQLiteBroker, SQLiteBroker]]:
    """Two brokers on one file: separate connections and wake-ups, like two processes."""
    path = str(tmp_path / "conveyor.db")
    async with SQLiteBroker(path) as a, SQLiteBroker(path, poll_interval_ms=20) as b:
        yield a, b


async def _row_count(broker: SQLiteBroker, table: str) -> int:
    sql = {"events": "SELECT count(*) FROM events", "logs": "SELECT count(*) FROM logs"}[table]
    count: int = await broker._db.read(lambda conn: conn.execute(sql).fetchone()[0])
    return count


async def test_sqlite_calls_run_on_the_brokers_own_thread(tmp_path: Path) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db")) as broker:
        name = await broker._db.read(lambda conn: threading.current_thread().name)
    assert name.startswith("conveyor-sqlite")
    assert name != threading.current_thread().name


async def test_wait_for_jobs_is_woken_at_once_by_this_brokers_enqueue(tmp_path: Path) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db"), poll_interval_ms=5000) as broker:
        waiter = asyncio.create_task(broker.wait_for_jobs(["q"], 10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        started = time.monotonic()
        await broker.enqueue([_job()])
        await asyncio.wait_for(waiter, 2)
        assert time.monotonic() - started < 1  # not the 5 s poll


async def test_wait_for_jobs_sees_another_process_enqueue_within_the_poll_interval(
    pair: tuple[SQLiteBroker, SQLiteBroker],
) -> None:
    a, b = pair
    waiter = asyncio.create_task(b.wait_for_jobs(["q"], 10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    started = time.monotonic()
    await a.enqueue([_job()])
    await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - started < 1


async def test_wait_for_jobs_times_out_when_nothing_comes(tmp_path: Path) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db"), poll_interval_ms=20) as broker:
        await broker.enqueue([_job(queue="other")])
        started = time.monotonic()
        await broker.wait_for_jobs(["q"], 0.3)
        assert 0.25 <= time.monotonic() - started < 2


async def test_wait_for_jobs_returns_when_a_scheduled_job_falls_due(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SQLiteBroker(str(tmp_path / "x.db"), clock=clock, poll_interval_ms=20) as broker:
        await broker.enqueue([_job(run_at_ms=clock.now_ms() + 60_000)])
        waiter = asyncio.create_task(broker.wait_for_jobs(["q"], 10))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        clock.advance(61)
        await asyncio.wait_for(waiter, 2)
        assert len(await broker.reserve("q", 5, lease_s=30)) == 1  # promoted by reserve


async def test_a_subscriber_sees_another_process_events(
    pair: tuple[SQLiteBroker, SQLiteBroker],
) -> None:
    a, b = pair
    stream = b.subscribe(queue="q")
    # b's cursor read is queued on b's thread; a writes on another connection, so (as with two
    # processes) wait until b has taken its cursor before a writes
    await b.ping()
    job_id = await a.enqueue([_job()])
    async with contextlib.aclosing(stream) as events:  # type: ignore[type-var]
        first: JobEvent = await asyncio.wait_for(anext(events), 2)
    assert (first.job_id, first.state, first.transition) == (job_id[0], JobState.QUEUED, "enqueue")


async def test_the_events_table_is_trimmed_to_the_retention(tmp_path: Path) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db"), event_retention=20) as broker:
        for _ in range(10):
            await broker.enqueue([_job() for _ in range(10)])
        assert await _row_count(broker, "events") <= 20 + 2  # trimmed every retention // 10
        replayed: list[JobEvent] = []
        async with contextlib.aclosing(broker.subscribe(after="0")) as events:  # type: ignore[type-var]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for event in events:
                        replayed.append(event)
        assert 20 <= len(replayed) <= 22
        assert int(replayed[-1].id) == 100  # ids keep counting: the cursor survives the trim


async def test_the_log_cap_is_enforced_per_append_and_drops_are_counted(tmp_path: Path) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db"), max_log_lines=3) as broker:
        [job_id] = await broker.enqueue([_job()])
        [job] = await broker.reserve("q", 1, lease_s=30)
        await broker.append_log(job.lease, ["1", "2", "3", "4", "5"])  # one append over the cap
        await broker.append_log(job.lease, ["6"])
        page = await broker.logs(job_id)
        assert (page.lines, page.dropped, page.total) == (["4", "5", "6"], 3, 3)
        assert await _row_count(broker, "logs") == 3
        assert (await broker.logs(job_id, offset=1, limit=1)).lines == ["5"]
        await broker.delete(job_id)
        assert await _row_count(broker, "logs") == 0  # logs go with their job


async def test_lease_tokens_are_unique_per_reservation(tmp_path: Path) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db")) as broker:
        await broker.enqueue([_job() for _ in range(5)])
        first = await broker.reserve("q", 5, lease_s=30)
        for job in first:
            await broker.release(job.lease)
        second = await broker.reserve("q", 5, lease_s=30)
        tokens = [j.lease_token for j in first + second]
        assert len(set(tokens)) == 10
        with pytest.raises(Exception, match="stale"):
            await broker.ack(first[0].lease)


async def test_redrive_runs_a_dead_letter_without_the_dedup_key_a_live_job_holds(
    tmp_path: Path,
) -> None:
    async with SQLiteBroker(str(tmp_path / "x.db")) as broker:
        [dead] = await broker.enqueue([_job(dedup_key="k")])
        [job] = await broker.reserve("q", 1, lease_s=30)
        await broker.dead_letter(job.lease, reason=FailureReason.GAVE_UP, error="x")
        [live] = await broker.enqueue([_job(dedup_key="k")])  # the key is free again
        assert live != dead
        assert await broker.redrive("q") == 1  # nothing is skipped silently ...
        stored = await broker.get(dead)
        assert stored is not None
        # ... and two live jobs never share a key (the unique index would refuse it).
        assert (stored.state, stored.dedup_key) == (JobState.QUEUED, None)


async def test_a_cancelled_reserve_leaves_leases_that_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SQLiteBroker(str(tmp_path / "x.db"), clock=clock) as broker:
        await broker.enqueue([_job() for _ in range(3)])
        task = asyncio.create_task(broker.reserve("q", 3, lease_s=10))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await broker.ping()  # the queued call ran (or not) before this one
        running = (await broker.counts("q"))["q"][JobState.RUNNING]
        clock.advance(11)
        report = await broker.requeue_expired("q")
        assert len(report.requeued) == running
        assert (await broker.counts("q"))["q"][JobState.QUEUED] == 3
