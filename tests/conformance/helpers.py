"""Shared helpers for the conformance tests: job factories, state shortcuts, an event collector."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from conveyor.brokers.base import Broker, JobEvent
from conveyor.job import FailureReason, Job, JobState, Lease, new_job_id

QUEUE = "q"
TASK = "tests.noop"
LEASE_S = 30.0
#: how long a test waits for something that should happen at once (real seconds)
PROMPT_S = 5.0


def make_job(**fields: Any) -> Job:
    """A job for QUEUE/TASK with a fresh id, overridden by ``fields``."""
    fields.setdefault("id", new_job_id())
    fields.setdefault("task", TASK)
    fields.setdefault("queue", QUEUE)
    return Job(**fields)


async def enqueue_one(broker: Broker, **fields: Any) -> str:
    """Enqueue one job built by :func:`make_job`; return its id."""
    [job_id] = await broker.enqueue([make_job(**fields)])
    return job_id


async def must_get(broker: Broker, job_id: str) -> Job:
    """The stored job, which must exist."""
    job = await broker.get(job_id)
    assert job is not None, f"job {job_id} should exist"
    return job


async def reserve_ids(broker: Broker, queue: str = QUEUE, n: int = 100) -> list[str]:
    """Reserve up to ``n`` jobs of ``queue`` and return their ids in reserve order."""
    return [job.id for job in await broker.reserve(queue, n, lease_s=LEASE_S, worker_id="w1")]


async def reserve_job(broker: Broker, job_id: str, *, lease_s: float = LEASE_S) -> Job:
    """Reserve exactly ``job_id`` (it must be queued); other jobs taken on the way are released."""
    job = await must_get(broker, job_id)
    taken = await broker.reserve(job.queue, 1000, lease_s=lease_s, worker_id="w1")
    mine = [j for j in taken if j.id == job_id]
    for other in taken:
        if other.id != job_id:
            await broker.release(other.lease)
    assert len(mine) == 1, f"job {job_id} should have been reservable"
    return mine[0]


async def job_in_state(broker: Broker, state: JobState, **fields: Any) -> Job:
    """Enqueue a job and drive it to ``state``; return it as stored (running: as reserved)."""
    if state == JobState.PENDING:
        job_id = await enqueue_one(broker, state=JobState.PENDING, **fields)
    elif state == JobState.SCHEDULED:
        job_id = await enqueue_one(broker, run_at_ms=broker.clock.now_ms() + 3_600_000, **fields)
    else:
        job_id = await enqueue_one(broker, **fields)
    if state == JobState.STOPPED:
        await broker.cancel(job_id)
    elif state in (JobState.RUNNING, JobState.COMPLETED, JobState.FAILED):
        running = await reserve_job(broker, job_id)
        if state == JobState.RUNNING:
            return running
        if state == JobState.COMPLETED:
            await broker.ack(running.lease, {"ok": True})
        else:
            await broker.dead_letter(
                running.lease, reason=FailureReason.GAVE_UP, error="boom", traceback="tb"
            )
    job = await must_get(broker, job_id)
    assert job.state == state
    return job


def stale_lease(job: Job) -> Lease:
    """A lease for ``job`` with a token no broker ever handed out."""
    return Lease(job_id=job.id, queue=job.queue, token="forged-token")


class EventCollector:
    """Consumes a subscription in a background task and records what arrives."""

    def __init__(self, stream: AsyncIterator[JobEvent]) -> None:
        self.events: list[JobEvent] = []
        self.ended = False
        self._arrived = asyncio.Event()
        self.task = asyncio.create_task(self._consume(stream))

    async def _consume(self, stream: AsyncIterator[JobEvent]) -> None:
        try:
            async for event in stream:
                self.events.append(event)
                self._arrived.set()
        finally:
            self.ended = True
            self._arrived.set()

    def of(self, job_id: str) -> list[JobEvent]:
        """The events received for one job, in arrival order."""
        return [e for e in self.events if e.job_id == job_id]

    async def wait_until(
        self, done: Callable[[list[JobEvent]], bool], timeout_s: float = PROMPT_S
    ) -> None:
        """Wait (bounded) until ``done(events)`` holds; raise TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            while not done(self.events):
                if self.task.done():
                    self.task.result()  # surface the consumer's exception, if any
                    raise AssertionError(f"subscription ended early; got {self.events!r}")
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_for(self, job_id: str, n: int, timeout_s: float = PROMPT_S) -> list[JobEvent]:
        """Wait until ``n`` events of ``job_id`` have arrived; return them."""
        await self.wait_until(lambda _: len(self.of(job_id)) >= n, timeout_s)
        return self.of(job_id)

    async def sync(self, broker: Broker, queue: str) -> None:
        """Make sure the subscription is live: enqueue probe jobs in ``queue`` until one shows up.

        Subscriptions may take a moment to become active on a networked broker; probes are
        deleted afterwards so they never get reserved by the test.
        """
        probes: list[str] = []
        try:
            async with asyncio.timeout(PROMPT_S * 2):
                while True:
                    probe = await enqueue_one(broker, queue=queue, task="tests.probe")
                    probes.append(probe)
                    with contextlib.suppress(TimeoutError):
                        await self.wait_for(probe, 1, timeout_s=0.2)
                        return
        finally:
            for probe in probes:
                await broker.delete(probe)

    async def stop(self) -> None:
        """Cancel the consumer and wait for it to finish."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def collecting(broker: Broker, **filters: Any) -> AsyncIterator[EventCollector]:
    """Subscribe with ``filters`` and collect events until the block ends."""
    collector = EventCollector(broker.subscribe(**filters))
    try:
        yield collector
    finally:
        await collector.stop()


async def event_cursor(broker: Broker) -> str:
    """The id of an event published just now: subscribe with ``after`` it to see what follows."""
    probe_queue = "conformance-probe"
    async with collecting(broker, queue=probe_queue) as events:
        await events.sync(broker, probe_queue)

        # sync deleted its probes: once every probe's deleted event is in, the last one is the
        # newest event this test knows of
        def all_deleted(evs: list[JobEvent]) -> bool:
            deleted = {e.job_id for e in evs if e.kind == "deleted"}
            return bool(deleted) and all(e.job_id in deleted for e in evs)

        await events.wait_until(all_deleted)
        return events.events[-1].id
