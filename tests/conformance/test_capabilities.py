"""Conformance: what only some brokers promise (declared in ``Broker.capabilities``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.job import JobState

from .helpers import LEASE_S, job_in_state, make_job, must_get


@pytest.mark.requires_capability("durable")
async def test_an_acknowledged_enqueue_survives_reopening_the_broker(
    broker: Broker, broker_kind: str, make_broker: Callable[..., Broker], clock: FakeClock
) -> None:
    job = make_job(args=[1, "two"])
    await broker.enqueue([job])
    done = await job_in_state(broker, JobState.COMPLETED)
    await broker.close()

    async with make_broker(broker_kind, clock=clock) as reopened:
        again = await must_get(reopened, job.id)
        assert (again.state, again.args) == (JobState.QUEUED, [1, "two"])
        assert (await must_get(reopened, done.id)).result == {"ok": True}


@pytest.mark.requires_capability("shared")
async def test_two_broker_instances_share_one_store(
    broker: Broker, broker_kind: str, make_broker: Callable[..., Broker], clock: FakeClock
) -> None:
    job = make_job()
    await broker.enqueue([job])

    async with make_broker(broker_kind, clock=clock) as other:
        [reserved] = await other.reserve("q", 1, lease_s=LEASE_S)
        assert reserved.id == job.id
        assert await broker.reserve("q", 1, lease_s=LEASE_S) == []
        await broker.ack(reserved.lease, "done elsewhere")

        assert (await must_get(other, job.id)).result == "done elsewhere"
