"""The key schema: one slot per queue, no stray keys, and a real (single-node) Redis Cluster run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis.keys import GlobalKeys, QueueKeys, hash_slot
from conveyor.clock import FakeClock
from conveyor.errors import BrokerError
from conveyor.job import FailureReason, Job, JobState, new_job_id
from conveyor.testing.redis_server import RedisServer, free_port, redis_server_binary

pytestmark = pytest.mark.redis


def test_hash_slot_matches_the_redis_cluster_specification() -> None:
    # Reference values from the Redis Cluster specification (CRC16-XMODEM of "123456789").
    assert hash_slot("123456789") == 0x31C3
    assert hash_slot("{user1000}.following") == hash_slot("{user1000}.followers")
    assert hash_slot("foo{}{bar}") == hash_slot("foo{}{bar}")  # empty tag: the whole key
    assert hash_slot("foo{{bar}}zap") == hash_slot("{bar")


@pytest.mark.parametrize("queue", ["default", "emails.high", "Q-1_x"])
def test_every_key_of_a_queue_is_in_one_slot(queue: str) -> None:
    keys = QueueKeys("conveyor", queue)
    every = [*keys.script_keys, keys.log(new_job_id()), keys.log("with}brace{")]

    assert {hash_slot(key) for key in every} == {hash_slot(f"conveyor:{queue}")}
    assert all(key.startswith(f"{{conveyor:{queue}}}:") for key in every)


def test_the_global_keys_share_one_slot() -> None:
    keys = GlobalKeys("conveyor")
    assert len({hash_slot(key) for key in keys.script_keys}) == 1


async def _workload(broker: RedisBroker, queues: list[str]) -> list[str]:
    """Drive jobs of ``queues`` through every script; return the ids that still exist."""
    ids = await broker.enqueue(
        [
            Job(id=new_job_id(), task="t", queue=q, dedup_key=f"d{i}")
            for q in queues
            for i in range(4)
        ]
        + [Job(id=new_job_id(), task="t", queue=queues[0], state=JobState.PENDING)]
        + [Job(id=new_job_id(), task="t", queue=queues[0], run_at_ms=broker.clock.now_ms() + 10)]
    )
    await broker.start(ids[-2])
    for queue in queues:
        jobs = await broker.reserve(queue, 10, lease_s=30)
        await broker.extend_lease([j.lease for j in jobs], 30)
        await broker.set_progress(jobs[0].lease, 10, "x")
        await broker.append_log(jobs[0].lease, ["a", "b"])
        await broker.ack_many([(jobs[0].lease, {"r": 1})])
        await broker.retry(jobs[1].lease, run_at_ms=broker.clock.now_ms() + 5, error="e")
        await broker.dead_letter(jobs[2].lease, reason=FailureReason.GAVE_UP, error="e")
        await broker.release(jobs[3].lease)
        await broker.redrive(queue)
        await broker.requeue_expired(queue)
        await broker.promote_scheduled(queue)
    await broker.cancel(ids[1])
    await broker.delete(ids[0])
    await broker.purge(queues[-1])
    await broker.cleanup(0)
    await broker.list_jobs()
    await broker.counts()
    await broker.logs(ids[2])
    return ids


async def test_a_workload_creates_only_schema_keys(rbroker: RedisBroker, raw: Any) -> None:
    await _workload(rbroker, ["a", "b"])

    names = {key.decode() for key in raw.scan_iter(count=1000)}
    stray = {
        n
        for n in names
        if n not in GlobalKeys("conveyor").script_keys
        and not n.startswith(("{conveyor:a}:", "{conveyor:b}:"))
    }
    assert not stray
    assert {hash_slot(n) for n in names if n.startswith("{conveyor:a}")} == {
        hash_slot("conveyor:a")
    }


async def test_delete_and_cleanup_remove_every_key_of_a_job(
    rbroker: RedisBroker, raw: Any, clock: FakeClock
) -> None:
    ids = await rbroker.enqueue([Job(id=new_job_id(), task="t", queue="q") for _ in range(3)])
    jobs = await rbroker.reserve("q", 3, lease_s=30)
    for job in jobs:
        await rbroker.append_log(job.lease, ["line"] * 3)
    await rbroker.ack(jobs[0].lease, {"big": "result"})
    await rbroker.cancel(jobs[1].id)

    await rbroker.delete(jobs[2].id)
    clock.advance(ms=1)
    await rbroker.cleanup(0)

    assert not [k for k in raw.scan_iter(match="*:log:*")]
    keys = rbroker.queue_keys("q")
    assert raw.hlen(keys.jobs) == raw.hlen(keys.meta) == raw.hlen(keys.results) == 0
    assert raw.hlen(keys.logmeta) == 0
    assert raw.zcard(keys.all) == 0
    assert not [i for i in ids if raw.hexists(rbroker.global_keys.index, i)]


# -- a real cluster node: Redis refuses scripts whose declared keys span slots, and multi-key
# commands across slots (undeclared keys are not checked by Redis 7.0: test_redis_lua checks the
# scripts only ever touch keys that came in through KEYS).


@pytest.fixture
def cluster_node(tmp_path: Path) -> Any:
    """A one-node Redis Cluster that owns every slot."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    # The cluster bus defaults to port + 10000, which may be taken or past 65535: pick one.
    bus = str(free_port())
    server = RedisServer(
        extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", bus
        ]
    )  # fmt: skip
    server.start()
    client = redis.Redis(port=server.port)
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)
        yield server
    finally:
        client.close()
        server.close()


async def test_every_transition_runs_on_a_cluster_node(cluster_node: RedisServer) -> None:
    broker = RedisBroker(cluster_node.url)
    async with broker:
        assert broker.multi_queue_commands is False  # detected at connect

        ids = await _workload(broker, ["a", "b"])

        assert (await broker.get(ids[2])) is not None
        await broker.wait_for_jobs(["a", "b"], timeout_s=0.05)
        waiter = asyncio.create_task(broker.wait_for_jobs(["a", "b"], timeout_s=10))
        await asyncio.sleep(0.1)
        await broker.enqueue([Job(id=new_job_id(), task="t", queue="b")])
        async with asyncio.timeout(5):
            await waiter


async def test_a_cluster_node_refuses_multi_queue_commands(cluster_node: RedisServer) -> None:
    # Why the detection matters: one BLPOP over two queues spans two slots.
    broker = RedisBroker(cluster_node.url)
    async with broker:
        broker.multi_queue_commands = True
        with pytest.raises(BrokerError, match="same slot"):
            await broker.wait_for_jobs(["a", "b"], timeout_s=0.05)
