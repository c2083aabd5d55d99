"""Conformance: enqueue, deduplication and validation (all or nothing)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.codec import DEFAULT_MAX_PAYLOAD_BYTES
from conveyor.errors import (
    ConveyorError,
    InvalidJobError,
    PayloadTooLargeError,
    UnencodablePayloadError,
)
from conveyor.job import JobState, Priority, RetrySpec

from .helpers import enqueue_one, job_in_state, make_job, must_get


async def test_enqueue_returns_ids_in_order_and_stores_queued_jobs(
    broker: Broker, clock: FakeClock
) -> None:
    jobs = [make_job(args=[i]) for i in range(3)]

    ids = await broker.enqueue(jobs)

    assert ids == [job.id for job in jobs]
    for i, job_id in enumerate(ids):
        stored = await must_get(broker, job_id)
        assert stored.state == JobState.QUEUED
        assert stored.args == [i]
        assert stored.enqueued_ms == clock.now_ms()
        assert stored.run_at_ms == clock.now_ms()
        assert stored.attempts == 0
        assert stored.lease_token is None


async def test_enqueue_of_an_empty_batch_returns_no_ids(broker: Broker) -> None:
    assert await broker.enqueue([]) == []
    assert await broker.queues() == []


async def test_enqueue_keeps_payload_and_options(broker: Broker) -> None:
    job = make_job(
        args=[1, 2.5, "naïve ✓", None, True, [1, [2]], {"k": "v"}],
        kwargs={"nested": {"list": [1, 2, 3], "empty": {}}, "n": -7},
        priority=Priority.LOW,
        max_attempts=5,
        max_lost_leases=2,
        timeout_s=1.5,
        dedup_key="key-1",
        retry=RetrySpec(kind="fixed", delay_s=2.0),
        on_success="tests.after",
    )

    await broker.enqueue([job])
    stored = await must_get(broker, job.id)

    assert stored.args == job.args
    assert stored.kwargs == job.kwargs
    assert stored.priority == Priority.LOW
    assert stored.max_attempts == 5
    assert stored.max_lost_leases == 2
    assert stored.timeout_s == 1.5
    assert stored.dedup_key == "key-1"
    assert stored.retry == RetrySpec(kind="fixed", delay_s=2.0)
    assert stored.on_success == "tests.after"


async def test_enqueue_with_a_future_run_at_stores_a_scheduled_job(
    broker: Broker, clock: FakeClock
) -> None:
    run_at = clock.now_ms() + 10_000
    stored = await must_get(broker, await enqueue_one(broker, run_at_ms=run_at))
    assert stored.state == JobState.SCHEDULED
    assert stored.run_at_ms == run_at


async def test_enqueue_with_a_past_run_at_stores_a_queued_job(
    broker: Broker, clock: FakeClock
) -> None:
    stored = await must_get(broker, await enqueue_one(broker, run_at_ms=clock.now_ms() - 10_000))
    assert stored.state == JobState.QUEUED


async def test_enqueue_of_a_pending_job_holds_it(broker: Broker) -> None:
    stored = await must_get(broker, await enqueue_one(broker, state=JobState.PENDING))
    assert stored.state == JobState.PENDING


async def test_enqueue_resets_bookkeeping_fields_given_by_the_caller(broker: Broker) -> None:
    job_id = await enqueue_one(
        broker,
        state=JobState.RUNNING,
        attempts=2,
        lost_leases=1,
        lease_token="forged",
        lease_expires_ms=1,
        error="old",
        traceback="old tb",
        failure_reason="poison",
        result={"old": True},
        finished_ms=1,
    )

    stored = await must_get(broker, job_id)

    assert stored.state == JobState.QUEUED
    assert (stored.attempts, stored.lost_leases) == (0, 0)
    assert stored.lease_token is None
    assert stored.lease_expires_ms is None
    assert stored.error is None
    assert stored.traceback is None
    assert stored.failure_reason is None
    assert stored.result is None
    assert stored.finished_ms is None


async def test_stored_job_is_not_changed_by_mutating_the_input_or_a_returned_copy(
    broker: Broker,
) -> None:
    job = make_job(args=[[1, 2]], kwargs={"d": {"x": 1}})
    await broker.enqueue([job])

    job.args[0].append(3)
    job.kwargs["d"]["x"] = 2
    copy = await must_get(broker, job.id)
    copy.args.append("junk")
    copy.kwargs["extra"] = 1
    copy.state = JobState.COMPLETED

    stored = await must_get(broker, job.id)
    assert stored.args == [[1, 2]]
    assert stored.kwargs == {"d": {"x": 1}}
    assert stored.state == JobState.QUEUED


@pytest.mark.parametrize(
    "state", [JobState.PENDING, JobState.QUEUED, JobState.SCHEDULED, JobState.RUNNING]
)
async def test_dedup_key_of_a_live_job_returns_the_live_job_id(
    broker: Broker, state: JobState
) -> None:
    live = await job_in_state(broker, state, dedup_key="k")

    ids = await broker.enqueue([make_job(dedup_key="k")])

    assert ids == [live.id]
    assert (await broker.counts("q"))["q"][state] == 1
    assert sum((await broker.counts("q"))["q"].values()) == 1


async def test_dedup_key_is_scoped_to_its_queue(broker: Broker) -> None:
    first = make_job(queue="a", dedup_key="k")
    second = make_job(queue="b", dedup_key="k")

    ids = await broker.enqueue([first, second])

    assert ids == [first.id, second.id]
    assert await broker.get(second.id) is not None


async def test_two_jobs_with_one_dedup_key_in_a_batch_collapse_into_the_first(
    broker: Broker,
) -> None:
    first, other, dup = make_job(dedup_key="k"), make_job(), make_job(dedup_key="k")

    ids = await broker.enqueue([first, other, dup])

    assert ids == [first.id, other.id, first.id]
    assert await broker.get(dup.id) is None
    assert (await broker.counts("q"))["q"][JobState.QUEUED] == 2


@pytest.mark.parametrize("state", [JobState.COMPLETED, JobState.FAILED, JobState.STOPPED])
async def test_a_finished_job_frees_its_dedup_key(broker: Broker, state: JobState) -> None:
    finished = await job_in_state(broker, state, dedup_key="k")
    fresh = make_job(dedup_key="k")

    ids = await broker.enqueue([fresh])

    assert ids == [fresh.id]
    assert ids != [finished.id]
    assert (await must_get(broker, fresh.id)).state == JobState.QUEUED


async def test_a_deleted_job_frees_its_dedup_key(broker: Broker) -> None:
    old = await enqueue_one(broker, dedup_key="k")
    await broker.delete(old)
    fresh = make_job(dedup_key="k")

    assert await broker.enqueue([fresh]) == [fresh.id]


BAD_JOBS: list[Any] = [
    pytest.param({"queue": "has spaces"}, InvalidJobError, "queue name", id="bad-queue-name"),
    pytest.param({"queue": ""}, InvalidJobError, "queue name", id="empty-queue-name"),
    pytest.param({"priority": "urgent"}, InvalidJobError, "high, normal, low", id="bad-priority"),
    pytest.param({"task": "1 not a task"}, InvalidJobError, "task name", id="bad-task-name"),
    pytest.param({"max_attempts": 0}, InvalidJobError, "max_attempts", id="zero-attempts"),
    pytest.param({"timeout_s": -1.0}, InvalidJobError, "timeout_s", id="negative-timeout"),
    pytest.param(
        {"args": [datetime.datetime(2024, 1, 1)]},
        UnencodablePayloadError,
        "isoformat",
        id="unencodable-payload",
    ),
    pytest.param(
        {"kwargs": {"x": float("nan")}}, UnencodablePayloadError, "finite", id="nan-payload"
    ),
    pytest.param(
        {"kwargs": {"blob": "x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)}},
        PayloadTooLargeError,
        "store large data elsewhere",
        id="oversized-payload",
    ),
]


@pytest.mark.parametrize(("bad_fields", "error", "advice"), BAD_JOBS)
async def test_a_batch_with_one_bad_job_writes_nothing_and_says_what_to_do(
    broker: Broker, bad_fields: dict[str, Any], error: type[ConveyorError], advice: str
) -> None:
    good_before = make_job(dedup_key="dk")
    bad = make_job(**bad_fields)
    good_after = make_job(queue="other")

    with pytest.raises(error, match=advice) as raised:
        await broker.enqueue([good_before, bad, good_after])

    assert isinstance(raised.value, ConveyorError)
    assert await broker.get(good_before.id) is None
    assert await broker.get(good_after.id) is None
    assert await broker.queues() == []
    assert (await broker.list_jobs()).jobs == []
    # the dedup key was not claimed either
    retry_ok = make_job(dedup_key="dk")
    assert await broker.enqueue([retry_ok]) == [retry_ok.id]
