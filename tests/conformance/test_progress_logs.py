"""Conformance: progress, description and per-job logs (with the line cap)."""

from __future__ import annotations

import pytest

from conveyor.brokers.base import Broker
from conveyor.errors import JobNotFound, LeaseLost
from conveyor.job import JobState, Lease

from .helpers import job_in_state, must_get, stale_lease


@pytest.mark.parametrize(("given", "kept"), [(42, 42), (150, 100), (-5, 0), (0, 0), (100, 100)])
async def test_set_progress_is_clamped_and_read_back(broker: Broker, given: int, kept: int) -> None:
    job = await job_in_state(broker, JobState.RUNNING)

    await broker.set_progress(job.lease, given)

    assert (await must_get(broker, job.id)).progress == kept


async def test_set_progress_with_only_a_description_keeps_the_progress(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    await broker.set_progress(job.lease, 30, "downloading")

    await broker.set_progress(job.lease, description="unpacking")

    stored = await must_get(broker, job.id)
    assert (stored.progress, stored.description) == (30, "unpacking")


async def test_set_progress_cuts_a_long_description_to_1024_chars(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)

    await broker.set_progress(job.lease, description="d" * 5000)

    assert (await must_get(broker, job.id)).description == "d" * 1024


async def test_set_progress_with_a_stale_token_is_rejected(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)

    with pytest.raises(LeaseLost):
        await broker.set_progress(stale_lease(job), 50, "nope")

    stored = await must_get(broker, job.id)
    assert (stored.progress, stored.description) == (0, "")


async def test_logs_read_back_in_order_with_offset_and_limit(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    await broker.append_log(job.lease, ["one", "two"])
    await broker.append_log(job.lease, ["three", "four", "five"])

    everything = await broker.logs(job.id)
    middle = await broker.logs(job.id, offset=1, limit=2)
    tail = await broker.logs(job.id, offset=4)

    assert everything.lines == ["one", "two", "three", "four", "five"]
    assert (everything.dropped, everything.total) == (0, 5)
    assert middle.lines == ["two", "three"]
    assert middle.total == 5
    assert tail.lines == ["five"]


async def test_log_cap_keeps_the_newest_lines_and_counts_the_dropped(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    cap = broker.max_log_lines
    await broker.append_log(job.lease, [f"line {i}" for i in range(cap - 2)])
    await broker.append_log(job.lease, [f"line {i}" for i in range(cap - 2, cap + 5)])

    page = await broker.logs(job.id)

    assert page.dropped == 5
    assert page.total == cap
    assert page.lines == [f"line {i}" for i in range(5, cap + 5)]
    assert (await broker.logs(job.id, offset=0, limit=1)).lines == ["line 5"]


async def test_lines_the_caller_dropped_are_counted_so_kept_plus_dropped_is_all(
    broker: Broker,
) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    await broker.append_log(job.lease, ["a", "b"])
    # A worker whose buffer overflowed between flushes passes how many older lines it let go.
    await broker.append_log(job.lease, ["y", "z"], dropped=7)
    await broker.append_log(job.lease, [], dropped=1)

    page = await broker.logs(job.id)

    assert page.lines == ["a", "b", "y", "z"]
    assert page.dropped == 8
    assert page.total + page.dropped == 2 + 7 + 2 + 1


async def test_a_job_without_logs_reads_back_empty(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.QUEUED)

    page = await broker.logs(job.id)

    assert (page.lines, page.dropped, page.total) == ([], 0, 0)


async def test_append_log_keeps_lines_from_a_cancelled_job(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    await broker.cancel(job.id)

    await broker.append_log(job.lease, ["last words"])

    assert (await broker.logs(job.id)).lines == ["last words"]


async def test_append_log_to_an_unknown_job_raises_job_not_found(broker: Broker) -> None:
    with pytest.raises(JobNotFound):
        await broker.append_log(Lease(job_id="no-such-job", queue="q", token="t"), ["x"])


async def test_logs_of_an_unknown_job_raise_job_not_found(broker: Broker) -> None:
    with pytest.raises(JobNotFound):
        await broker.logs("no-such-job")
