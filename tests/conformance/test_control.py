"""Conformance: the control plane (start, cancel, delete, redrive, purge, cleanup)."""

from __future__ import annotations

import pytest

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.errors import InvalidJobError, InvalidTransition, JobNotFound, LeaseLost
from conveyor.job import FailureReason, JobState

from .helpers import LEASE_S, enqueue_one, job_in_state, must_get, reserve_ids, reserve_job

LIVE = [JobState.PENDING, JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING]
FINISHED = [JobState.COMPLETED, JobState.FAILED, JobState.STOPPED]

# -- start ---------------------------------------------------------------------------------------


async def test_start_moves_a_pending_job_to_queued(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.PENDING)

    started = await broker.start(job.id)

    assert started.state == JobState.QUEUED
    assert (await must_get(broker, job.id)).state == JobState.QUEUED


async def test_start_of_a_pending_job_with_a_future_run_at_schedules_it(
    broker: Broker, clock: FakeClock
) -> None:
    job_id = await enqueue_one(broker, state=JobState.PENDING, run_at_ms=clock.now_ms() + 60_000)
    assert (await must_get(broker, job_id)).state == JobState.PENDING

    started = await broker.start(job_id)

    assert started.state == JobState.SCHEDULED
    assert await reserve_ids(broker) == []


@pytest.mark.parametrize(
    "state", [JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING, *FINISHED]
)
async def test_start_of_a_job_that_is_not_pending_raises_invalid_transition(
    broker: Broker, state: JobState
) -> None:
    job = await job_in_state(broker, state)

    with pytest.raises(InvalidTransition):
        await broker.start(job.id)

    assert (await must_get(broker, job.id)).state == state


async def test_start_of_an_unknown_job_raises_job_not_found(broker: Broker) -> None:
    with pytest.raises(JobNotFound):
        await broker.start("no-such-job")


# -- cancel --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [JobState.PENDING, JobState.QUEUED, JobState.SCHEDULED])
async def test_cancel_of_a_waiting_job_stops_it_and_it_is_never_reserved(
    broker: Broker, clock: FakeClock, state: JobState
) -> None:
    job = await job_in_state(broker, state)

    stopped = await broker.cancel(job.id)

    assert stopped.state == JobState.STOPPED
    assert (await must_get(broker, job.id)).state == JobState.STOPPED
    clock.advance(7200)
    await broker.promote_scheduled("q")
    assert await reserve_ids(broker) == []


async def test_cancel_of_a_running_job_revokes_its_lease(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)

    stopped = await broker.cancel(job.id)

    assert stopped.state == JobState.STOPPED
    with pytest.raises(LeaseLost):
        await broker.ack(job.lease, "too late")
    assert await broker.extend_lease([job.lease], LEASE_S) == [False]
    stored = await must_get(broker, job.id)
    assert stored.state == JobState.STOPPED
    assert stored.result is None


async def test_a_cancelled_running_job_is_not_recovered_by_requeue_expired(
    broker: Broker, clock: FakeClock
) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    await broker.cancel(job.id)
    clock.advance(LEASE_S + 1)

    report = await broker.requeue_expired("q")

    assert (report.requeued, report.dead_lettered) == ([], [])
    assert (await must_get(broker, job.id)).state == JobState.STOPPED


@pytest.mark.parametrize("state", FINISHED)
async def test_cancel_of_a_finished_job_raises_invalid_transition(
    broker: Broker, state: JobState
) -> None:
    job = await job_in_state(broker, state)

    with pytest.raises(InvalidTransition):
        await broker.cancel(job.id)

    assert await must_get(broker, job.id) == job


async def test_cancel_of_an_unknown_job_raises_job_not_found(broker: Broker) -> None:
    with pytest.raises(JobNotFound):
        await broker.cancel("no-such-job")


# -- delete --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [*LIVE, *FINISHED])
async def test_delete_removes_a_job_in_any_state(broker: Broker, state: JobState) -> None:
    job = await job_in_state(broker, state)

    await broker.delete(job.id)

    assert await broker.get(job.id) is None
    with pytest.raises(JobNotFound):
        await broker.delete(job.id)
    with pytest.raises(JobNotFound):
        await broker.logs(job.id)
    assert sum((await broker.counts("q"))["q"].values()) == 0


async def test_delete_of_a_running_job_revokes_its_lease(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)

    await broker.delete(job.id)

    with pytest.raises(JobNotFound):
        await broker.ack(job.lease)
    assert await broker.extend_lease([job.lease], LEASE_S) == [False]
    assert await broker.get(job.id) is None


async def test_a_deleted_queued_job_is_never_reserved(broker: Broker) -> None:
    doomed = await enqueue_one(broker)
    kept = await enqueue_one(broker)

    await broker.delete(doomed)

    assert await reserve_ids(broker) == [kept]


async def test_delete_of_an_unknown_job_raises_job_not_found(broker: Broker) -> None:
    with pytest.raises(JobNotFound):
        await broker.delete("no-such-job")


# -- redrive -------------------------------------------------------------------------------------


async def test_redrive_without_ids_requeues_every_failed_job_of_the_queue_reset(
    broker: Broker,
) -> None:
    failed = [(await job_in_state(broker, JobState.FAILED)).id for _ in range(2)]
    stopped = await job_in_state(broker, JobState.STOPPED)
    elsewhere = await job_in_state(broker, JobState.FAILED, queue="other")

    assert await broker.redrive("q") == 2

    for job_id in failed:
        job = await must_get(broker, job_id)
        assert job.state == JobState.QUEUED
        assert (job.attempts, job.lost_leases) == (0, 0)
        assert (job.error, job.traceback, job.failure_reason) == (None, None, None)
    assert (await must_get(broker, stopped.id)).state == JobState.STOPPED
    assert (await must_get(broker, elsewhere.id)).state == JobState.FAILED
    assert sorted(await reserve_ids(broker)) == sorted(failed)


async def test_redrive_resets_a_poison_job_so_it_can_run_again(
    broker: Broker, clock: FakeClock
) -> None:
    job_id = await enqueue_one(broker, max_attempts=5, max_lost_leases=1)
    await reserve_job(broker, job_id)
    clock.advance(LEASE_S + 1)
    assert (await broker.requeue_expired("q")).dead_lettered == [job_id]

    assert await broker.redrive("q", [job_id]) == 1

    job = await reserve_job(broker, job_id)
    assert (job.attempts, job.lost_leases, job.failure_reason) == (0, 0, None)
    await broker.ack(job.lease, "fine now")
    assert (await must_get(broker, job_id)).state == JobState.COMPLETED


async def test_redrive_by_id_includes_stopped_jobs_and_skips_the_rest(broker: Broker) -> None:
    failed = await job_in_state(broker, JobState.FAILED)
    stopped = await job_in_state(broker, JobState.STOPPED)
    completed = await job_in_state(broker, JobState.COMPLETED)
    queued = await job_in_state(broker, JobState.QUEUED)
    other_queue = await job_in_state(broker, JobState.FAILED, queue="other")

    count = await broker.redrive(
        "q", [failed.id, stopped.id, completed.id, queued.id, other_queue.id, "no-such-job"]
    )

    assert count == 2
    assert (await must_get(broker, failed.id)).state == JobState.QUEUED
    assert (await must_get(broker, stopped.id)).state == JobState.QUEUED
    assert (await must_get(broker, completed.id)).state == JobState.COMPLETED
    assert (await must_get(broker, other_queue.id)).state == JobState.FAILED


async def test_redrive_reclaims_a_free_dedup_key(broker: Broker) -> None:
    failed = await job_in_state(broker, JobState.FAILED, dedup_key="k")

    assert await broker.redrive("q", [failed.id]) == 1

    assert (await must_get(broker, failed.id)).dedup_key == "k"
    assert await enqueue_one(broker, dedup_key="k") == failed.id  # it holds the key again


async def test_redrive_drops_a_dedup_key_another_live_job_holds_and_skips_nothing(
    broker: Broker,
) -> None:
    failed = await job_in_state(broker, JobState.FAILED, dedup_key="k")
    holder = await enqueue_one(broker, dedup_key="k")  # the key was free: a new live job took it

    assert await broker.redrive("q") == 1

    redriven = await must_get(broker, failed.id)
    assert (redriven.state, redriven.dedup_key) == (JobState.QUEUED, None)
    assert await enqueue_one(broker, dedup_key="k") == holder  # the key stays with its holder
    ids = await reserve_ids(broker)
    assert sorted(ids) == sorted([failed.id, holder])
    # Once the holder is done, the key is free; the re-driven job never claims it back.
    [lease_of_holder] = [
        job.lease for job in [await must_get(broker, holder)] if job.lease_token is not None
    ]
    await broker.ack(lease_of_holder)
    fresh = await enqueue_one(broker, dedup_key="k")
    assert fresh not in (failed.id, holder)


async def test_redrive_of_two_dead_letters_with_one_dedup_key_gives_it_to_the_first(
    broker: Broker,
) -> None:
    first = await job_in_state(broker, JobState.FAILED, dedup_key="k")
    second = await job_in_state(broker, JobState.FAILED, dedup_key="k")

    assert await broker.redrive("q", [second.id, first.id]) == 2

    assert (await must_get(broker, first.id)).dedup_key == "k"
    assert (await must_get(broker, second.id)).dedup_key is None
    assert await enqueue_one(broker, dedup_key="k") == first.id


async def test_redrive_of_a_queue_without_dead_letters_does_nothing(broker: Broker) -> None:
    queued = await job_in_state(broker, JobState.QUEUED)

    assert await broker.redrive("q") == 0
    assert await broker.redrive("never-used") == 0
    assert await must_get(broker, queued.id) == queued


# -- purge ---------------------------------------------------------------------------------------


async def _one_of_each(broker: Broker, queue: str = "q") -> dict[JobState, str]:
    return {s: (await job_in_state(broker, s, queue=queue)).id for s in [*LIVE, *FINISHED]}


async def test_purge_by_default_removes_jobs_that_have_not_started(broker: Broker) -> None:
    jobs = await _one_of_each(broker)

    assert await broker.purge("q") == 3

    for state, job_id in jobs.items():
        exists = await broker.get(job_id) is not None
        assert exists == (state not in (JobState.PENDING, JobState.QUEUED, JobState.SCHEDULED))
    assert await reserve_ids(broker) == []


async def test_purge_never_removes_running_jobs(broker: Broker) -> None:
    running = await job_in_state(broker, JobState.RUNNING)
    queued = await job_in_state(broker, JobState.QUEUED)

    with pytest.raises(InvalidJobError, match="cancel"):
        await broker.purge("q", [JobState.RUNNING, JobState.QUEUED])

    assert (await must_get(broker, running.id)).state == JobState.RUNNING
    assert (await must_get(broker, queued.id)).state == JobState.QUEUED


async def test_purge_of_failed_removes_only_dead_letters(broker: Broker) -> None:
    jobs = await _one_of_each(broker)

    assert await broker.purge("q", [JobState.FAILED]) == 1

    assert await broker.get(jobs[JobState.FAILED]) is None
    remaining = await broker.counts("q")
    assert remaining["q"][JobState.FAILED] == 0
    assert sum(remaining["q"].values()) == len(jobs) - 1


async def test_purge_touches_only_its_queue(broker: Broker) -> None:
    mine = await job_in_state(broker, JobState.QUEUED, queue="mine")
    theirs = await job_in_state(broker, JobState.QUEUED, queue="theirs")

    assert await broker.purge("mine") == 1

    assert await broker.get(mine.id) is None
    assert await broker.get(theirs.id) is not None


# -- cleanup -------------------------------------------------------------------------------------


async def test_cleanup_removes_only_finished_jobs_past_retention(
    broker: Broker, clock: FakeClock
) -> None:
    old = await _one_of_each(broker)
    clock.advance(3600)
    recent = {s: (await job_in_state(broker, s)).id for s in FINISHED}
    clock.advance(60)

    removed = await broker.cleanup(retention_s=600)

    assert removed == 3
    for state, job_id in old.items():
        assert (await broker.get(job_id) is None) == (state in FINISHED)
    for job_id in recent.values():
        assert await broker.get(job_id) is not None


async def test_cleanup_filters_by_queue(broker: Broker, clock: FakeClock) -> None:
    mine = await job_in_state(broker, JobState.COMPLETED, queue="mine")
    theirs = await job_in_state(broker, JobState.COMPLETED, queue="theirs")
    clock.advance(3600)

    assert await broker.cleanup(retention_s=60, queue="mine") == 1

    assert await broker.get(mine.id) is None
    assert await broker.get(theirs.id) is not None


async def test_cleanup_with_nothing_old_enough_removes_nothing(
    broker: Broker, clock: FakeClock
) -> None:
    job = await job_in_state(broker, JobState.FAILED)
    clock.advance(30)

    assert await broker.cleanup(retention_s=60) == 0
    assert (await must_get(broker, job.id)).failure_reason == FailureReason.GAVE_UP
