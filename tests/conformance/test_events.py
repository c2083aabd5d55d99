"""Conformance: job events (order per job, resume with ``after``, filters, end on close)."""

from __future__ import annotations

import asyncio

from conveyor.brokers.base import Broker, EventKind, JobEvent
from conveyor.clock import FakeClock
from conveyor.job import FailureReason, JobState

from .helpers import PROMPT_S, EventCollector, collecting, enqueue_one, event_cursor, reserve_job


def _summary(events: list[JobEvent]) -> list[tuple[object, ...]]:
    """What matters per event: its kind and the kind-specific payload."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if e.kind == EventKind.STATE:
            out.append((e.kind, e.state, e.transition))
        elif e.kind == EventKind.PROGRESS:
            out.append((e.kind, e.progress, e.description))
        elif e.kind == EventKind.LOG:
            out.append((e.kind, e.line))
        else:
            out.append((e.kind,))
    return out


async def _lifecycle(broker: Broker, clock: FakeClock, queue: str = "q") -> str:
    """Drive one job through every kind of event; 8 events in all."""
    job_id = await enqueue_one(broker, queue=queue)
    job = await reserve_job(broker, job_id)
    await broker.set_progress(job.lease, 50, "half way")
    await broker.append_log(job.lease, ["a", "b"])
    await broker.retry(job.lease, run_at_ms=clock.now_ms(), error="boom")
    job = await reserve_job(broker, job_id)
    await broker.dead_letter(job.lease, reason=FailureReason.GAVE_UP, error="boom again")
    return job_id


LIFECYCLE = [
    (EventKind.STATE, JobState.QUEUED, "enqueue"),
    (EventKind.STATE, JobState.RUNNING, "reserve"),
    (EventKind.PROGRESS, 50, "half way"),
    (EventKind.LOG, "a"),
    (EventKind.LOG, "b"),
    (EventKind.STATE, JobState.QUEUED, "retry"),
    (EventKind.STATE, JobState.RUNNING, "reserve"),
    (EventKind.STATE, JobState.FAILED, "dead_letter"),
]


async def test_events_of_a_job_arrive_in_order_to_a_live_subscriber(
    broker: Broker, clock: FakeClock
) -> None:
    async with collecting(broker, queue="q") as live:
        await live.sync(broker, "q")

        job_id = await _lifecycle(broker, clock)

        events = await live.wait_for(job_id, len(LIFECYCLE))
    assert _summary(events) == LIFECYCLE
    assert {(e.job_id, e.queue) for e in events} == {(job_id, "q")}
    assert all(e.ts_ms == clock.now_ms() for e in events)
    assert len({e.id for e in events}) == len(events)


async def test_subscribe_resumes_after_an_event_id_without_gaps(
    broker: Broker, clock: FakeClock
) -> None:
    async with collecting(broker, queue="q") as live:
        await live.sync(broker, "q")
        job_id = await _lifecycle(broker, clock)
        seen = await live.wait_for(job_id, len(LIFECYCLE))

    async with collecting(broker, job_id=job_id, after=seen[2].id) as resumed:
        replayed = await resumed.wait_for(job_id, len(LIFECYCLE) - 3)

    assert [e.id for e in replayed] == [e.id for e in seen[3:]]
    assert _summary(replayed) == LIFECYCLE[3:]


async def test_a_resumed_subscription_continues_with_new_events(broker: Broker) -> None:
    cursor = await event_cursor(broker)
    first = await enqueue_one(broker)

    async with collecting(broker, queue="q", after=cursor) as events:
        await events.wait_for(first, 1)
        second = await enqueue_one(broker)
        await events.wait_for(second, 1)

    assert [e.job_id for e in events.events] == [first, second]


async def test_subscribe_without_after_gets_only_new_events(broker: Broker) -> None:
    old = await enqueue_one(broker)

    async with collecting(broker, queue="q") as events:
        await events.sync(broker, "q")
        new = await enqueue_one(broker)
        await events.wait_for(new, 1)

    assert events.of(old) == []


async def test_subscribe_filters_by_queue(broker: Broker) -> None:
    async with collecting(broker, queue="mine") as events:
        await events.sync(broker, "mine")
        theirs = await enqueue_one(broker, queue="theirs")
        mine = await enqueue_one(broker, queue="mine")
        await broker.cancel(theirs)
        await broker.cancel(mine)
        await events.wait_for(mine, 2)

    assert events.of(theirs) == []
    assert {e.queue for e in events.events} == {"mine"}


async def test_subscribe_filters_by_job_id(broker: Broker) -> None:
    cursor = await event_cursor(broker)
    mine = await enqueue_one(broker)
    theirs = await enqueue_one(broker)
    await broker.cancel(theirs)
    await broker.cancel(mine)

    async with collecting(broker, job_id=mine, after=cursor) as events:
        await events.wait_for(mine, 2)

    assert _summary(events.events) == [
        (EventKind.STATE, JobState.QUEUED, "enqueue"),
        (EventKind.STATE, JobState.STOPPED, "cancel"),
    ]


async def test_deleting_a_job_publishes_a_deleted_event(broker: Broker) -> None:
    cursor = await event_cursor(broker)
    job_id = await enqueue_one(broker)
    await broker.delete(job_id)

    async with collecting(broker, job_id=job_id, after=cursor) as events:
        received = await events.wait_for(job_id, 2)

    assert [e.kind for e in received] == [EventKind.STATE, EventKind.DELETED]


async def test_purge_and_cleanup_publish_deleted_events(broker: Broker, clock: FakeClock) -> None:
    cursor = await event_cursor(broker)
    purged = await enqueue_one(broker)
    await broker.purge("q")
    cleaned = await enqueue_one(broker)
    await broker.cancel(cleaned)
    clock.advance(120)
    await broker.cleanup(retention_s=60)

    async with collecting(broker, queue="q", after=cursor) as events:
        await events.wait_for(cleaned, 3)
        await events.wait_for(purged, 2)

    assert events.of(purged)[-1].kind == EventKind.DELETED
    assert events.of(cleaned)[-1].kind == EventKind.DELETED


async def test_subscribe_ends_when_the_broker_closes(broker: Broker) -> None:
    collector = EventCollector(broker.subscribe())
    try:
        await asyncio.sleep(0.05)  # let the consumer start waiting

        await broker.close()

        async with asyncio.timeout(PROMPT_S):
            await collector.task
        assert collector.ended
    finally:
        await collector.stop()
