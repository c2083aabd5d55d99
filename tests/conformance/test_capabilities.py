"""Conformance: what only some brokers promise, checked against what each one declares.

Each test runs on every broker: a broker that declares a capability must show it, and one that
declares it missing must show that too (so a declaration can never silently drift).
"""

from __future__ import annotations

from collections.abc import Callable

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.job import JobState

from .helpers import LEASE_S, job_in_state, make_job, must_get


async def test_an_acknowledged_enqueue_survives_reopening_a_durable_broker(
    broker: Broker, broker_kind: str, make_broker: Callable[..., Broker], clock: FakeClock
) -> None:
    job = make_job(args=[1, "two"])
    await broker.enqueue([job])
    done = await job_in_state(broker, JobState.COMPLETED)
    await broker.close()

    async with make_broker(broker_kind, clock=clock) as reopened:
        if not broker.capabilities.durable:
            assert await reopened.get(job.id) is None
            assert await reopened.get(done.id) is None
            return
        again = await must_get(reopened, job.id)
        assert (again.state, again.args) == (JobState.QUEUED, [1, "two"])
        assert (await must_get(reopened, done.id)).result == {"ok": True}


async def test_two_instances_of_a_shared_broker_share_one_store(
    broker: Broker, broker_kind: str, make_broker: Callable[..., Broker], clock: FakeClock
) -> None:
    job = make_job()
    await broker.enqueue([job])

    async with make_broker(broker_kind, clock=clock) as other:
        if not broker.capabilities.shared:
            assert await other.reserve("q", 1, lease_s=LEASE_S) == []
            assert await other.get(job.id) is None
            return
        [reserved] = await other.reserve("q", 1, lease_s=LEASE_S)
        assert reserved.id == job.id
        assert await broker.reserve("q", 1, lease_s=LEASE_S) == []
        await broker.ack(reserved.lease, "done elsewhere")

        assert (await must_get(other, job.id)).result == "done elsewhere"
