"""On a 3-master Redis Cluster: every script call stays in one slot; queues spread over masters."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis.keys import QueueKeys, hash_slot
from conveyor.brokers.redis.scripts import SCRIPT_NAMES
from conveyor.errors import BrokerError
from conveyor.job import FailureReason, Job, JobState, new_job_id
from conveyor.testing.redis_cluster import RedisCluster

pytestmark = pytest.mark.redis

QUEUES = [f"queue-{i}" for i in range(12)]


def _keyslot(client: redis.Redis, key: str) -> int:
    return int(client.execute_command("CLUSTER", "KEYSLOT", key))


async def _every_transition(broker: RedisBroker, queues: Sequence[str]) -> None:
    """Drive jobs of ``queues`` through every script the broker runs on a cluster."""
    clock = broker.clock
    jobs = [
        Job(id=new_job_id(), task="t", queue=q, dedup_key=f"d{i}") for q in queues for i in range(5)
    ]
    pending = Job(id=new_job_id(), task="t", queue=queues[0], state=JobState.PENDING)
    later = Job(id=new_job_id(), task="t", queue=queues[0], run_at_ms=clock.now_ms() + 10)
    ids = await broker.enqueue([*jobs, pending, later])
    await broker.start(pending.id)
    for queue in queues:
        taken = await broker.reserve(queue, 10, lease_s=30)
        await broker.extend_lease([j.lease for j in taken], 30)
        await broker.set_progress(taken[0].lease, 10, "x")
        await broker.append_log(taken[0].lease, ["a", "b"])
        await broker.ack_many([(taken[0].lease, {"r": 1})])
        await broker.ack_and_reserve([(taken[4].lease, None)], queue, 1, lease_s=30)
        await broker.retry(taken[1].lease, run_at_ms=clock.now_ms() + 5, error="e")
        await broker.dead_letter(taken[2].lease, reason=FailureReason.GAVE_UP, error="e")
        await broker.release(taken[3].lease)
        await broker.redrive(queue)
        await broker.requeue_expired(queue)
        clock.advance(0.1)
        await broker.promote_scheduled(queue)
    await broker.cancel(ids[1])
    await broker.delete(ids[0])
    await broker.purge(queues[-1])
    await broker.cleanup(0)


async def test_every_script_call_names_keys_of_one_slot(
    cbroker: RedisBroker, redis_cluster: RedisCluster, masters: dict[int, redis.Redis]
) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []
    run = cbroker.run_script

    async def recording(name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        calls.append((name, tuple(keys)))
        return await run(name, keys, args)

    cbroker.run_script = recording  # type: ignore[method-assign]  # observe, then delegate
    queues = QUEUES[:3]
    await _every_transition(cbroker, queues)

    # Every script but the single-server shortcut that spans the index and a queue.
    assert {name for name, _ in calls} == set(SCRIPT_NAMES) - {"index_and_enqueue"}
    probe = next(iter(masters.values()))
    allowed = {_keyslot(probe, cbroker.global_keys.index)} | {
        _keyslot(probe, cbroker.queue_keys(q).jobs) for q in queues
    }
    for name, keys in calls:
        slots = {_keyslot(probe, key) for key in set(keys)}  # the server's own CLUSTER KEYSLOT
        assert len(slots) == 1, f"{name} spans slots {slots}"
        assert slots <= allowed
        assert {hash_slot(key) for key in keys} == slots  # keys.hash_slot agrees with Redis
    assert not any(redis_cluster.crossslot_errors().values())


async def test_the_cluster_client_refuses_a_script_call_that_spans_slots(
    cbroker: RedisBroker, redis_cluster: RedisCluster
) -> None:
    a, b = cbroker.queue_keys(QUEUES[0]), cbroker.queue_keys(QUEUES[1])
    assert hash_slot(a.jobs) != hash_slot(b.jobs)
    with pytest.raises(BrokerError, match=r"same key slot"), cbroker.boundary("ack"):
        await cbroker.run_script("promote_scheduled", (*a.script_keys[:-1], b.logmeta), [0, 1, 10])
    # Refused before it was sent: no master saw it.
    assert not any(redis_cluster.crossslot_errors().values())


async def test_twelve_queues_spread_over_the_masters(
    cbroker: RedisBroker, redis_cluster: RedisCluster, masters: dict[int, redis.Redis]
) -> None:
    await cbroker.enqueue([Job(id=new_job_id(), task="t", queue=q) for q in QUEUES])
    owners = redis_cluster.slot_owners()
    probe = next(iter(masters.values()))
    home: dict[str, int] = {}
    for queue in QUEUES:
        keys = QueueKeys(cbroker.prefix, queue)
        slots = {_keyslot(probe, key) for key in keys.all_keys()}
        assert len(slots) == 1  # the whole queue lives in one slot...
        slot = slots.pop()
        home[queue] = owners[slot]
        # ...on one master, which holds its keys (COUNTKEYSINSLOT counts a node's own keys).
        holders = {
            port
            for port, client in masters.items()
            if client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        }
        assert holders == {home[queue]}
    assert len(set(home.values())) > 1, f"all 12 queues landed on one master: {home}"
    counts = await cbroker.counts()
    assert {q: row[JobState.QUEUED] for q, row in counts.items()} == dict.fromkeys(QUEUES, 1)


async def test_cross_queue_reads_waits_and_events_work_across_masters(
    cbroker: RedisBroker, redis_cluster: RedisCluster
) -> None:
    owners = redis_cluster.slot_owners()
    by_master: dict[int, str] = {}
    for queue in QUEUES:
        by_master.setdefault(owners[hash_slot(cbroker.queue_keys(queue).jobs)], queue)
    queues = sorted(by_master.values())
    assert len(queues) >= 2  # queues on different masters

    events = cbroker.subscribe()
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.2)  # the subscription has taken its position
    ids = await cbroker.enqueue([Job(id=new_job_id(), task="t", queue=q) for q in queues])
    async with asyncio.timeout(5):
        seen = {(await first).job_id}
        while seen != set(ids):
            seen.add((await anext(events)).job_id)
    await events.aclose()

    page = await cbroker.list_jobs(limit=len(queues))
    assert [job.id for job in page.jobs] == ids[::-1]  # newest first, merged across masters

    for queue in queues:
        await cbroker.reserve(queue, 10, lease_s=30)
    waiter = asyncio.ensure_future(cbroker.wait_for_jobs(queues, timeout_s=10))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await cbroker.enqueue([Job(id=new_job_id(), task="t", queue=queues[-1])])
    async with asyncio.timeout(5):
        await waiter
