"""Conformance: leases, ack, retry, dead letters, release, lease expiry and stale-token fencing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.errors import JobNotFound, LeaseLost, UnencodablePayloadError
from conveyor.job import FailureReason, Job, JobState, Lease

from .helpers import (
    LEASE_S,
    enqueue_one,
    make_job,
    must_get,
    reserve_ids,
    reserve_job,
    stale_lease,
)


async def _running(broker: Broker, **fields: Any) -> Job:
    return await reserve_job(broker, await enqueue_one(broker, **fields))


async def _expire_and_requeue(broker: Broker, clock: FakeClock, job: Job) -> None:
    assert job.lease_expires_ms is not None
    clock.set(job.lease_expires_ms + 1_000)
    await broker.requeue_expired(job.queue)


# -- ack -----------------------------------------------------------------------------------------


async def test_ack_completes_the_job_and_charges_the_attempt(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker)
    clock.advance(3)

    await broker.ack(job.lease, {"answer": 42, "items": [1, 2]})

    done = await must_get(broker, job.id)
    assert done.state == JobState.COMPLETED
    assert done.attempts == 1
    assert done.result == {"answer": 42, "items": [1, 2]}
    assert done.finished_ms == clock.now_ms()
    assert await broker.reserve("q", 10, lease_s=LEASE_S) == []


async def test_ack_with_an_unencodable_result_raises_and_changes_nothing(broker: Broker) -> None:
    job = await _running(broker)
    before = await must_get(broker, job.id)

    with pytest.raises(UnencodablePayloadError):
        await broker.ack(job.lease, {"when": object()})

    assert await must_get(broker, job.id) == before
    await broker.ack(job.lease, None)  # the lease is still good
    assert (await must_get(broker, job.id)).state == JobState.COMPLETED


async def test_ack_of_an_unknown_job_raises_job_not_found(broker: Broker) -> None:
    with pytest.raises(JobNotFound):
        await broker.ack(Lease(job_id="no-such-job", queue="q", token="t"))


async def test_ack_with_a_forged_token_is_rejected(broker: Broker) -> None:
    job = await _running(broker)

    with pytest.raises(LeaseLost):
        await broker.ack(stale_lease(job))

    assert (await must_get(broker, job.id)).state == JobState.RUNNING


async def test_ack_twice_is_rejected_the_second_time(broker: Broker) -> None:
    job = await _running(broker)
    await broker.ack(job.lease)

    with pytest.raises(LeaseLost):
        await broker.ack(job.lease)

    assert (await must_get(broker, job.id)).attempts == 1


async def test_ack_after_the_lease_expired_and_the_job_was_requeued_is_rejected(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker)
    await _expire_and_requeue(broker, clock, job)

    with pytest.raises(LeaseLost):
        await broker.ack(job.lease)

    stored = await must_get(broker, job.id)
    assert stored.state == JobState.QUEUED
    assert stored.attempts == 1


def _stale_ops() -> dict[str, Callable[[Broker, Lease], Awaitable[object]]]:
    return {
        "ack": lambda b, lease: b.ack(lease, "late"),
        "retry": lambda b, lease: b.retry(lease, run_at_ms=0, error="late"),
        "release": lambda b, lease: b.release(lease),
        "dead_letter": lambda b, lease: b.dead_letter(
            lease, reason=FailureReason.GAVE_UP, error="late"
        ),
        "set_progress": lambda b, lease: b.set_progress(lease, 99, "late"),
    }


@pytest.mark.parametrize("op", list(_stale_ops()))
async def test_stale_token_is_rejected_with_lease_lost_and_changes_nothing(
    broker: Broker, clock: FakeClock, op: str
) -> None:
    # A zombie worker holds the first lease; the job was recovered and re-delivered since.
    zombie = await _running(broker)
    await _expire_and_requeue(broker, clock, zombie)
    current = await reserve_job(broker, zombie.id)
    assert current.lease_token != zombie.lease_token
    before = await must_get(broker, zombie.id)

    with pytest.raises(LeaseLost):
        await _stale_ops()[op](broker, zombie.lease)

    assert await must_get(broker, zombie.id) == before
    await broker.ack(current.lease, "ok")  # the current holder is unaffected
    assert (await must_get(broker, zombie.id)).result == "ok"


async def test_ack_many_acks_held_leases_and_reports_stale_ones(broker: Broker) -> None:
    await broker.enqueue([make_job() for _ in range(3)])
    first, second, third = await broker.reserve("q", 3, lease_s=LEASE_S)
    await broker.cancel(second.id)
    unknown = Lease(job_id="no-such-job", queue="q", token="t")

    flags = await broker.ack_many(
        [(first.lease, 1), (second.lease, 2), (third.lease, {"r": 3}), (unknown, None)]
    )

    assert flags == [True, False, True, False]
    assert (await must_get(broker, first.id)).result == 1
    assert (await must_get(broker, second.id)).state == JobState.STOPPED
    done = await must_get(broker, third.id)
    assert (done.state, done.result, done.attempts) == (JobState.COMPLETED, {"r": 3}, 1)


# -- retry, dead letters, release ----------------------------------------------------------------


async def test_retry_schedules_the_job_charges_an_attempt_and_records_the_error(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker)
    run_at = clock.now_ms() + 5_000

    returned = await broker.retry(
        job.lease, run_at_ms=run_at, error="ValueError: x", traceback="tb"
    )

    stored = await must_get(broker, job.id)
    assert returned.state == stored.state == JobState.SCHEDULED
    assert stored.attempts == 1
    assert stored.run_at_ms == run_at
    assert (stored.error, stored.traceback) == ("ValueError: x", "tb")
    assert stored.lease_token is None
    assert await reserve_ids(broker) == []
    clock.advance(6)
    await broker.promote_scheduled("q")
    [again] = await broker.reserve("q", 1, lease_s=LEASE_S)
    assert (again.id, again.attempts) == (job.id, 1)


async def test_retry_with_a_due_run_at_requeues_at_once(broker: Broker, clock: FakeClock) -> None:
    job = await _running(broker)

    returned = await broker.retry(job.lease, run_at_ms=clock.now_ms(), error="boom")

    assert returned.state == JobState.QUEUED
    assert returned.attempts == 1
    assert await reserve_ids(broker) == [job.id]


async def test_dead_letter_fails_the_job_with_reason_error_and_traceback(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker)

    returned = await broker.dead_letter(
        job.lease, reason=FailureReason.GAVE_UP, error="KeyError: 'x'", traceback="Traceback..."
    )

    stored = await must_get(broker, job.id)
    assert returned.state == stored.state == JobState.FAILED
    assert stored.failure_reason == FailureReason.GAVE_UP
    assert (stored.error, stored.traceback) == ("KeyError: 'x'", "Traceback...")
    assert stored.attempts == 1
    assert stored.finished_ms == clock.now_ms()
    assert await reserve_ids(broker) == []


async def test_release_charges_nothing_and_keeps_the_fifo_position(broker: Broker) -> None:
    ids = await broker.enqueue([make_job() for _ in range(3)])
    [first] = await broker.reserve("q", 1, lease_s=LEASE_S)
    assert first.id == ids[0]

    released = await broker.release(first.lease)

    assert released.state == JobState.QUEUED
    assert released.attempts == 0
    assert released.lease_token is None
    assert await reserve_ids(broker) == ids


async def test_release_keeps_the_job_behind_higher_priorities(broker: Broker) -> None:
    normal = await _running(broker)
    high = await enqueue_one(broker, priority="high")
    later = await enqueue_one(broker)

    await broker.release(normal.lease)

    assert await reserve_ids(broker) == [high, normal.id, later]


# -- lease expiry --------------------------------------------------------------------------------


async def test_an_expired_lease_is_requeued_and_charges_an_attempt_and_a_lost_lease(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker, max_attempts=3, max_lost_leases=3)
    clock.advance(LEASE_S + 1)

    report = await broker.requeue_expired("q")

    assert report.requeued == [job.id]
    assert report.dead_lettered == []
    stored = await must_get(broker, job.id)
    assert stored.state == JobState.QUEUED
    assert (stored.attempts, stored.lost_leases) == (1, 1)
    assert stored.lease_token is None


async def test_an_expired_job_is_redelivered_with_a_new_token(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker)
    clock.advance(LEASE_S + 1)
    await broker.requeue_expired("q")

    [again] = await broker.reserve("q", 1, lease_s=LEASE_S)

    assert again.id == job.id
    assert again.lease_token != job.lease_token
    assert again.attempts == 1


async def test_a_lease_that_has_not_expired_is_not_requeued(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker)
    clock.advance(LEASE_S - 1)

    report = await broker.requeue_expired("q")

    assert (report.requeued, report.dead_lettered) == ([], [])
    assert (await must_get(broker, job.id)).state == JobState.RUNNING


async def test_requeue_expired_touches_only_its_queue(broker: Broker, clock: FakeClock) -> None:
    mine = await _running(broker, queue="mine")
    theirs = await _running(broker, queue="theirs")
    clock.advance(LEASE_S + 1)

    report = await broker.requeue_expired("mine")

    assert report.requeued == [mine.id]
    assert (await must_get(broker, theirs.id)).state == JobState.RUNNING


async def test_requeue_expired_honours_its_limit(broker: Broker, clock: FakeClock) -> None:
    await broker.enqueue([make_job() for _ in range(3)])
    await broker.reserve("q", 3, lease_s=LEASE_S)
    clock.advance(LEASE_S + 1)

    first = await broker.requeue_expired("q", limit=2)
    rest = await broker.requeue_expired("q", limit=2)

    assert (len(first.requeued), len(rest.requeued)) == (2, 1)
    assert (await broker.counts("q"))["q"][JobState.QUEUED] == 3


async def test_exhausted_attempts_dead_letter_the_job_with_reason_exhausted(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker, max_attempts=2, max_lost_leases=10)
    clock.advance(LEASE_S + 1)
    assert (await broker.requeue_expired("q")).requeued == [job.id]
    await reserve_job(broker, job.id)
    clock.advance(LEASE_S + 1)

    report = await broker.requeue_expired("q")

    assert report.dead_lettered == [job.id]
    stored = await must_get(broker, job.id)
    assert stored.state == JobState.FAILED
    assert stored.failure_reason == FailureReason.EXHAUSTED
    assert stored.attempts == 2


async def test_a_job_that_keeps_losing_its_lease_is_dead_lettered_as_poison(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker, max_attempts=10, max_lost_leases=2)
    clock.advance(LEASE_S + 1)
    assert (await broker.requeue_expired("q")).requeued == [job.id]
    await reserve_job(broker, job.id)
    clock.advance(LEASE_S + 1)

    report = await broker.requeue_expired("q")

    assert report.dead_lettered == [job.id]
    stored = await must_get(broker, job.id)
    assert stored.state == JobState.FAILED
    assert stored.failure_reason == FailureReason.POISON
    assert (stored.attempts, stored.lost_leases) == (2, 2)


async def test_a_failed_run_then_a_lost_lease_can_exhaust_attempts(
    broker: Broker, clock: FakeClock
) -> None:
    job = await _running(broker, max_attempts=2, max_lost_leases=5)
    await broker.retry(job.lease, run_at_ms=clock.now_ms(), error="boom")
    await reserve_job(broker, job.id)
    clock.advance(LEASE_S + 1)

    report = await broker.requeue_expired("q")

    assert report.dead_lettered == [job.id]
    stored = await must_get(broker, job.id)
    assert (stored.failure_reason, stored.attempts, stored.lost_leases) == ("exhausted", 2, 1)


# -- extend_lease --------------------------------------------------------------------------------


async def test_extend_lease_pushes_the_deadline_and_reports_each_lease(
    broker: Broker, clock: FakeClock
) -> None:
    await broker.enqueue([make_job() for _ in range(3)])
    held, cancelled, finished = await broker.reserve("q", 3, lease_s=LEASE_S)
    await broker.cancel(cancelled.id)
    await broker.ack(finished.lease)
    unknown = Lease(job_id="no-such-job", queue="q", token="t")
    clock.advance(20)

    flags = await broker.extend_lease(
        [held.lease, cancelled.lease, finished.lease, unknown, stale_lease(held)], 60
    )

    assert flags == [True, False, False, False, False]
    assert (await must_get(broker, held.id)).lease_expires_ms == clock.now_ms() + 60_000
    clock.advance(LEASE_S)  # past the original deadline, inside the extended one
    assert (await broker.requeue_expired("q")).requeued == []
    assert (await must_get(broker, held.id)).state == JobState.RUNNING


async def test_extend_lease_of_a_redelivered_job_with_the_old_token_is_refused(
    broker: Broker, clock: FakeClock
) -> None:
    zombie = await _running(broker)
    await _expire_and_requeue(broker, clock, zombie)
    current = await reserve_job(broker, zombie.id)

    assert await broker.extend_lease([zombie.lease, current.lease], LEASE_S) == [False, True]
