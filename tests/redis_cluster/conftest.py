"""Fixtures for the Redis Cluster tests: a broker on the session's 3-master cluster.

The cluster itself is the root conftest's ``redis_cluster`` (shared with the conformance
suite's ``redis-cluster`` kind, so the session starts one cluster).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from conveyor.brokers.redis import RedisBroker
from conveyor.clock import FakeClock
from conveyor.testing.redis_cluster import RedisCluster


@pytest.fixture(scope="session", autouse=True)
def no_crossslot_in_the_session(redis_cluster: RedisCluster) -> Iterator[None]:
    """At the end of the session, no master has refused a command for spanning slots.

    This covers every test of the session that used the cluster (the conformance suite's
    ``redis-cluster`` kind included), not just this directory's.
    """
    yield
    refused = {port: count for port, count in redis_cluster.crossslot_errors().items() if count}
    assert not refused, f"masters refused CROSSSLOT commands: {refused}"


@pytest.fixture
async def cbroker(redis_cluster: RedisCluster, clock: FakeClock) -> AsyncIterator[RedisBroker]:
    """A connected RedisBroker on the flushed cluster and the fake clock."""
    redis_cluster.flush()
    broker = RedisBroker(redis_cluster.url, clock=clock)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
def masters(redis_cluster: RedisCluster) -> Iterator[dict[int, redis.Redis]]:
    """A plain (non-cluster) client per master, by port: to look at one node's own keys."""
    clients = {port: redis.Redis(port=port) for port in redis_cluster.ports}
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()
