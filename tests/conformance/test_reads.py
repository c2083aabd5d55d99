"""Conformance: reads (get, list_jobs with filters and cursors, counts, queues)."""

from __future__ import annotations

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.job import Job, JobState

from .helpers import enqueue_one, job_in_state, make_job, must_get


async def test_get_returns_none_for_an_unknown_id(broker: Broker) -> None:
    assert await broker.get("no-such-job") is None


async def test_get_returns_the_job_as_stored(broker: Broker) -> None:
    job = make_job(args=[1], kwargs={"k": "v"}, task="tests.other")
    await broker.enqueue([job])

    stored = await must_get(broker, job.id)

    assert (stored.id, stored.task, stored.queue) == (job.id, "tests.other", "q")
    assert (stored.args, stored.kwargs) == ([1], {"k": "v"})


async def test_counts_have_every_state_for_every_queue(broker: Broker) -> None:
    for state in JobState:
        await job_in_state(broker, state)
    await job_in_state(broker, JobState.QUEUED, queue="other")

    counts = await broker.counts()

    assert set(counts) == {"q", "other"}
    assert counts["q"] == dict.fromkeys(JobState, 1)
    assert counts["other"] == {**dict.fromkeys(JobState, 0), JobState.QUEUED: 1}


async def test_counts_of_one_queue_have_only_that_queue(broker: Broker) -> None:
    await job_in_state(broker, JobState.RUNNING)
    await job_in_state(broker, JobState.QUEUED, queue="other")

    counts = await broker.counts("q")

    assert counts == {"q": {**dict.fromkeys(JobState, 0), JobState.RUNNING: 1}}


async def test_counts_follow_transitions(broker: Broker) -> None:
    job = await job_in_state(broker, JobState.RUNNING)
    await broker.ack(job.lease)
    await job_in_state(broker, JobState.QUEUED)

    row = (await broker.counts("q"))["q"]

    assert (row[JobState.RUNNING], row[JobState.COMPLETED], row[JobState.QUEUED]) == (0, 1, 1)
    assert sum(row.values()) == 2


async def test_queues_lists_the_queue_names_sorted(broker: Broker) -> None:
    for queue in ["zeta", "alpha", "mid", "alpha"]:
        await enqueue_one(broker, queue=queue)

    assert await broker.queues() == ["alpha", "mid", "zeta"]


async def test_list_jobs_returns_newest_enqueue_first(broker: Broker, clock: FakeClock) -> None:
    ids = []
    for _ in range(4):
        ids.append(await enqueue_one(broker))
        clock.advance(1)

    page = await broker.list_jobs()

    assert [job.id for job in page.jobs] == ids[::-1]
    assert page.next_cursor is None


async def test_list_jobs_filters_by_queue_state_and_task(broker: Broker) -> None:
    running = await job_in_state(broker, JobState.RUNNING, task="tests.a")
    queued_a = await job_in_state(broker, JobState.QUEUED, task="tests.a")
    queued_b = await job_in_state(broker, JobState.QUEUED, task="tests.b")
    other = await job_in_state(broker, JobState.QUEUED, queue="other", task="tests.a")

    def ids(page_jobs: list[Job]) -> set[str]:
        return {job.id for job in page_jobs}

    assert ids((await broker.list_jobs(queue="q")).jobs) == {running.id, queued_a.id, queued_b.id}
    assert ids((await broker.list_jobs(states=[JobState.QUEUED])).jobs) == {
        queued_a.id,
        queued_b.id,
        other.id,
    }
    assert ids((await broker.list_jobs(task="tests.a")).jobs) == {running.id, queued_a.id, other.id}
    assert ids(
        (await broker.list_jobs(queue="q", states=[JobState.QUEUED], task="tests.a")).jobs
    ) == {queued_a.id}
    assert ids((await broker.list_jobs(states=[JobState.RUNNING, JobState.COMPLETED])).jobs) == {
        running.id
    }


async def test_list_jobs_pages_with_a_cursor_without_duplicates_or_gaps(broker: Broker) -> None:
    # Same fake millisecond for every job: paging must not depend on distinct timestamps.
    ids = await broker.enqueue([make_job() for _ in range(5)])
    ids += await broker.enqueue([make_job() for _ in range(4)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await broker.list_jobs(limit=4, cursor=cursor)
        pages += 1
        assert len(page.jobs) <= 4
        seen += [job.id for job in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        if pages == 1:
            # jobs enqueued between pages are newer: they must not shift the pages that follow
            await broker.enqueue([make_job() for _ in range(3)])

    assert pages == 3
    assert len(seen) == len(set(seen)) == 9
    assert set(seen) == set(ids)


async def test_list_jobs_pages_respect_filters(broker: Broker, clock: FakeClock) -> None:
    wanted = []
    for i in range(7):
        wanted.append(await enqueue_one(broker))
        await enqueue_one(broker, queue="other")
        if i % 2:
            await job_in_state(broker, JobState.STOPPED)
        clock.advance(1)
    seen: list[str] = []
    cursor = None
    while True:
        page = await broker.list_jobs(queue="q", states=[JobState.QUEUED], limit=3, cursor=cursor)
        seen += [job.id for job in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == wanted[::-1]
