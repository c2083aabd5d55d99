"""Conformance: ack_and_reserve, the worker's "finish and take next" (ack_many, then reserve)."""

from __future__ import annotations

import pytest

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.errors import InvalidJobError, UnencodablePayloadError
from conveyor.job import JobState, Lease, Priority

from .helpers import LEASE_S, collecting, enqueue_one, make_job, must_get, stale_lease


async def test_it_acks_then_reserves_the_next_jobs_in_order(
    broker: Broker, clock: FakeClock
) -> None:
    await broker.enqueue([make_job(args=[i]) for i in range(2)])
    first, second = await broker.reserve("q", 2, lease_s=LEASE_S, worker_id="w1")
    low = await enqueue_one(broker, priority=Priority.LOW)
    high = await enqueue_one(broker, priority=Priority.HIGH)
    normal = await enqueue_one(broker)

    held, jobs = await broker.ack_and_reserve(
        [(first.lease, {"r": 1}), (second.lease, None)], "q", 2, lease_s=LEASE_S, worker_id="w1"
    )

    assert held == [True, True]
    assert [job.id for job in jobs] == [high, normal]  # reserve order: priority, then FIFO
    for job in jobs:
        assert job.state == JobState.RUNNING
        assert job.lease_token
        assert job.lease_expires_ms == clock.now_ms() + int(LEASE_S * 1000)
        assert job.worker_id == "w1"
        assert (await must_get(broker, job.id)).lease_token == job.lease_token
    done = await must_get(broker, first.id)
    assert (done.state, done.result, done.attempts) == (JobState.COMPLETED, {"r": 1}, 1)
    assert (await must_get(broker, second.id)).state == JobState.COMPLETED
    assert (await must_get(broker, low)).state == JobState.QUEUED


async def test_stale_acks_are_reported_and_change_nothing(broker: Broker) -> None:
    await broker.enqueue([make_job() for _ in range(3)])
    held_job, cancelled, forged = await broker.reserve("q", 3, lease_s=LEASE_S)
    await broker.cancel(cancelled.id)
    gone = Lease(job_id="no-such-job", queue="q", token="t")

    held, jobs = await broker.ack_and_reserve(
        [
            (held_job.lease, 1),
            (cancelled.lease, 2),
            (stale_lease(forged), 3),
            (gone, None),
            (held_job.lease, 4),  # the same lease twice acks once
        ],
        "q",
        5,
        lease_s=LEASE_S,
    )

    assert held == [True, False, False, False, False]
    assert jobs == []
    assert (await must_get(broker, held_job.id)).result == 1
    assert (await must_get(broker, cancelled.id)).state == JobState.STOPPED
    still = await must_get(broker, forged.id)
    assert (still.state, still.lease_token) == (JobState.RUNNING, forged.lease_token)


async def test_with_no_acks_it_is_a_reserve_and_with_n_zero_an_ack(broker: Broker) -> None:
    await broker.enqueue([make_job() for _ in range(2)])

    held, jobs = await broker.ack_and_reserve([], "q", 1, lease_s=LEASE_S)
    assert held == []
    assert len(jobs) == 1

    held, more = await broker.ack_and_reserve([(jobs[0].lease, None)], "q", 0, lease_s=LEASE_S)
    assert held == [True]
    assert more == []
    assert (await must_get(broker, jobs[0].id)).state == JobState.COMPLETED
    counts = (await broker.counts("q"))["q"]
    assert counts[JobState.QUEUED] == 1


async def test_it_promotes_due_scheduled_jobs_like_reserve(
    broker: Broker, clock: FakeClock
) -> None:
    delayed = await enqueue_one(broker, run_at_ms=clock.now_ms() + 5_000)
    _, jobs = await broker.ack_and_reserve([], "q", 5, lease_s=LEASE_S)
    assert jobs == []

    clock.advance(6)
    _, jobs = await broker.ack_and_reserve([], "q", 5, lease_s=LEASE_S)

    assert [job.id for job in jobs] == [delayed]


async def test_an_ack_of_another_queue_is_refused_before_anything_changes(
    broker: Broker,
) -> None:
    other = await enqueue_one(broker, queue="other")
    [running] = await broker.reserve("other", 1, lease_s=LEASE_S)
    await enqueue_one(broker)

    with pytest.raises(InvalidJobError, match="ack_many"):
        await broker.ack_and_reserve([(running.lease, None)], "q", 1, lease_s=LEASE_S)

    assert (await must_get(broker, other)).state == JobState.RUNNING
    assert (await broker.counts("q"))["q"][JobState.QUEUED] == 1


async def test_an_unencodable_result_raises_and_nothing_is_acked_or_reserved(
    broker: Broker,
) -> None:
    await broker.enqueue([make_job() for _ in range(2)])
    [running] = await broker.reserve("q", 1, lease_s=LEASE_S)

    with pytest.raises(UnencodablePayloadError):
        await broker.ack_and_reserve([(running.lease, {"x": object()})], "q", 1, lease_s=LEASE_S)

    assert (await must_get(broker, running.id)).state == JobState.RUNNING
    assert (await broker.counts("q"))["q"][JobState.QUEUED] == 1


async def test_it_publishes_the_ack_then_the_reserve_events(broker: Broker) -> None:
    first = await enqueue_one(broker)
    [running] = await broker.reserve("q", 1, lease_s=LEASE_S)
    async with collecting(broker, queue="q") as events:
        await events.sync(broker, "q")
        nxt = await enqueue_one(broker)

        await broker.ack_and_reserve([(running.lease, None)], "q", 1, lease_s=LEASE_S)

        await events.wait_for(nxt, 2)
        await events.wait_for(first, 1)
    acked = [e for e in events.of(first) if e.transition == "ack"]
    reserved = [e for e in events.of(nxt) if e.transition == "reserve"]
    assert [e.state for e in acked] == [JobState.COMPLETED]
    assert [e.state for e in reserved] == [JobState.RUNNING]
    order = [e.id for e in events.events]
    assert order.index(acked[0].id) < order.index(reserved[0].id)


async def test_a_finished_job_gives_its_dedup_key_back_before_the_reserve(
    broker: Broker,
) -> None:
    await enqueue_one(broker, dedup_key="k")
    [running] = await broker.reserve("q", 1, lease_s=LEASE_S)

    await broker.ack_and_reserve([(running.lease, None)], "q", 1, lease_s=LEASE_S)

    fresh = await enqueue_one(broker, dedup_key="k")
    assert fresh != running.id
