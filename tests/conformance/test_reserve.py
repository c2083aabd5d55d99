"""Conformance: reserve order, leases handed out, scheduling, pending jobs and wait_for_jobs."""

from __future__ import annotations

import asyncio
import time

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.job import Job, JobState, Priority

from .helpers import LEASE_S, PROMPT_S, enqueue_one, make_job, must_get, reserve_ids


async def test_reserve_takes_high_then_normal_then_low_priority(broker: Broker) -> None:
    low = await enqueue_one(broker, priority=Priority.LOW)
    normal = await enqueue_one(broker, priority=Priority.NORMAL)
    high = await enqueue_one(broker, priority=Priority.HIGH)

    assert await reserve_ids(broker) == [high, normal, low]


async def test_reserve_is_fifo_within_a_priority_even_in_the_same_millisecond(
    broker: Broker,
) -> None:
    # The fake clock does not move: order must come from enqueue order, not timestamps.
    first = await enqueue_one(broker)
    batch = await broker.enqueue([make_job() for _ in range(5)])
    last = await enqueue_one(broker)

    assert await reserve_ids(broker) == [first, *batch, last]


async def test_reserve_interleaves_priorities_and_fifo(broker: Broker) -> None:
    jobs = [make_job(priority=p) for p in [Priority.LOW, Priority.HIGH] * 3]
    await broker.enqueue(jobs)

    highs = [j.id for j in jobs if j.priority == Priority.HIGH]
    lows = [j.id for j in jobs if j.priority == Priority.LOW]
    assert await reserve_ids(broker, n=2) == highs[:2]
    assert await reserve_ids(broker) == [highs[2], *lows]


async def test_reserve_hands_out_a_lease_and_marks_the_job_running(
    broker: Broker, clock: FakeClock
) -> None:
    job_id = await enqueue_one(broker)

    [job] = await broker.reserve("q", 1, lease_s=30, worker_id="worker-7")

    assert job.id == job_id
    assert job.state == JobState.RUNNING
    assert job.lease_token
    assert job.lease_expires_ms == clock.now_ms() + 30_000
    assert job.started_ms == clock.now_ms()
    assert job.worker_id == "worker-7"
    assert job.attempts == 0  # reserve charges nothing; this run is attempt number 1
    stored = await must_get(broker, job_id)
    assert stored.state == JobState.RUNNING
    assert stored.lease_token == job.lease_token


async def test_each_reserve_hands_out_a_distinct_token(broker: Broker) -> None:
    await broker.enqueue([make_job() for _ in range(10)])

    jobs = await broker.reserve("q", 10, lease_s=LEASE_S)

    assert len({job.lease_token for job in jobs}) == 10


async def test_reserve_returns_at_most_n_jobs(broker: Broker) -> None:
    await broker.enqueue([make_job() for _ in range(5)])

    assert len(await broker.reserve("q", 3, lease_s=LEASE_S)) == 3
    assert len(await broker.reserve("q", 3, lease_s=LEASE_S)) == 2
    assert await broker.reserve("q", 3, lease_s=LEASE_S) == []


async def test_reserve_from_an_empty_or_unknown_queue_returns_nothing(broker: Broker) -> None:
    assert await broker.reserve("never-used", 10, lease_s=LEASE_S) == []


async def test_reserve_takes_only_jobs_of_the_named_queue(broker: Broker) -> None:
    mine = await enqueue_one(broker, queue="mine")
    theirs = await enqueue_one(broker, queue="theirs")

    assert await reserve_ids(broker, "mine") == [mine]
    assert (await must_get(broker, theirs)).state == JobState.QUEUED


async def test_a_reserved_job_is_not_reserved_again(broker: Broker) -> None:
    await enqueue_one(broker)

    assert len(await reserve_ids(broker)) == 1
    assert await reserve_ids(broker) == []


async def test_a_delayed_job_is_not_reserved_before_it_is_due(
    broker: Broker, clock: FakeClock
) -> None:
    job_id = await enqueue_one(broker, run_at_ms=clock.now_ms() + 10_000)

    clock.advance(9)
    assert await broker.promote_scheduled("q") == 0
    assert await reserve_ids(broker) == []
    assert (await must_get(broker, job_id)).state == JobState.SCHEDULED


async def test_a_delayed_job_is_reserved_once_due_and_promoted(
    broker: Broker, clock: FakeClock
) -> None:
    job_id = await enqueue_one(broker, run_at_ms=clock.now_ms() + 10_000)

    clock.advance(11)
    assert await broker.promote_scheduled("q") == 1
    assert (await must_get(broker, job_id)).state == JobState.QUEUED
    assert await reserve_ids(broker) == [job_id]


async def test_promote_scheduled_moves_only_due_jobs_of_its_queue_up_to_its_limit(
    broker: Broker, clock: FakeClock
) -> None:
    now = clock.now_ms()
    due = [await enqueue_one(broker, run_at_ms=now + 1_000 * i) for i in (1, 2, 3)]
    later = await enqueue_one(broker, run_at_ms=now + 60_000)
    elsewhere = await enqueue_one(broker, queue="other", run_at_ms=now + 1_000)
    clock.advance(5)

    assert await broker.promote_scheduled("q", limit=2) == 2
    assert await broker.promote_scheduled("q") == 1

    assert [(await must_get(broker, j)).state for j in due] == [JobState.QUEUED] * 3
    assert (await must_get(broker, later)).state == JobState.SCHEDULED
    assert (await must_get(broker, elsewhere)).state == JobState.SCHEDULED


async def test_promoted_jobs_are_reserved_by_priority_then_enqueue_order(
    broker: Broker, clock: FakeClock
) -> None:
    run_at = clock.now_ms() + 1_000
    normal = await enqueue_one(broker, run_at_ms=run_at)
    high = await enqueue_one(broker, run_at_ms=run_at + 500, priority=Priority.HIGH)
    clock.advance(2)

    await broker.promote_scheduled("q")

    assert await reserve_ids(broker) == [high, normal]


async def test_a_pending_job_is_not_reserved_until_started(broker: Broker) -> None:
    job_id = await enqueue_one(broker, state=JobState.PENDING)

    assert await reserve_ids(broker) == []

    started = await broker.start(job_id)
    assert started.state == JobState.QUEUED
    assert await reserve_ids(broker) == [job_id]


async def _fetch_one(broker: Broker, queue: str) -> Job:
    """What a worker's fetcher does: reserve, and block on wait_for_jobs when there is nothing."""
    while True:
        jobs = await broker.reserve(queue, 1, lease_s=LEASE_S)
        if jobs:
            return jobs[0]
        await broker.wait_for_jobs([queue], timeout_s=30)


async def test_wait_for_jobs_returns_promptly_after_an_enqueue_from_another_task(
    broker: Broker,
) -> None:
    fetcher = asyncio.create_task(_fetch_one(broker, "q"))
    await asyncio.sleep(0.1)  # let the fetcher block

    job_id = await enqueue_one(broker)

    async with asyncio.timeout(PROMPT_S):  # far below wait_for_jobs' own 30 s timeout
        job = await fetcher
    assert job.id == job_id


async def test_wait_for_jobs_watches_several_queues(broker: Broker) -> None:
    waiter = asyncio.create_task(broker.wait_for_jobs(["a", "b"], timeout_s=30))
    await asyncio.sleep(0.1)

    await enqueue_one(broker, queue="b")

    async with asyncio.timeout(PROMPT_S):
        await waiter


async def test_wait_for_jobs_returns_at_once_when_a_job_is_queued(broker: Broker) -> None:
    await enqueue_one(broker)
    started = time.monotonic()

    await broker.wait_for_jobs(["q"], timeout_s=10)

    assert time.monotonic() - started < PROMPT_S


async def test_wait_for_jobs_returns_at_once_when_a_scheduled_job_is_due(
    broker: Broker, clock: FakeClock
) -> None:
    await enqueue_one(broker, run_at_ms=clock.now_ms() + 1_000)
    clock.advance(2)
    started = time.monotonic()

    await broker.wait_for_jobs(["q"], timeout_s=10)

    assert time.monotonic() - started < PROMPT_S


async def test_wait_for_jobs_returns_after_its_timeout_when_nothing_comes(
    broker: Broker,
) -> None:
    async with asyncio.timeout(PROMPT_S):
        await broker.wait_for_jobs(["q"], timeout_s=0.05)


async def test_next_scheduled_ms_is_the_earliest_run_at_of_the_queues_scheduled_jobs(
    broker: Broker, clock: FakeClock
) -> None:
    assert await broker.next_scheduled_ms("q") is None
    now = clock.now_ms()
    await enqueue_one(broker)  # queued: not scheduled
    await enqueue_one(broker, state=JobState.PENDING, run_at_ms=now + 1_000)  # held: not either
    later = await enqueue_one(broker, run_at_ms=now + 9_000)
    await enqueue_one(broker, run_at_ms=now + 5_000)
    await enqueue_one(broker, queue="other", run_at_ms=now + 2_000)

    assert await broker.next_scheduled_ms("q") == now + 5_000
    assert await broker.next_scheduled_ms("other") == now + 2_000

    clock.advance(6)
    await broker.promote_scheduled("q")
    assert await broker.next_scheduled_ms("q") == now + 9_000
    await broker.cancel(later)
    assert await broker.next_scheduled_ms("q") is None
