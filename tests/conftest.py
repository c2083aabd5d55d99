"""Shared fixtures: a private redis-server, a fake clock, and a broker per backend."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.brokers import open_broker
from conveyor.brokers.base import Broker
from conveyor.clock import FakeClock
from conveyor.testing.redis_cluster import RedisCluster, redis_cli_binary
from conveyor.testing.redis_server import RedisServer, redis_server_binary

REQUIRE_REDIS = os.environ.get("CONVEYOR_REQUIRE_REDIS") == "1"
BROKER_KINDS = ["memory", "sqlite", "redis"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """A private redis-server for the whole session (None when CONVEYOR_TEST_REDIS_URL is set)."""
    if os.environ.get("CONVEYOR_TEST_REDIS_URL"):
        yield None
        return
    if redis_server_binary() is None:
        if REQUIRE_REDIS:
            pytest.fail("CONVEYOR_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed; Redis cases skipped (CI requires them)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private 3-master Redis Cluster for the whole session (conformance kind redis-cluster)."""
    if redis_server_binary() is None or redis_cli_binary() is None:
        if REQUIRE_REDIS:
            pytest.fail("CONVEYOR_REQUIRE_REDIS=1 but redis-server or redis-cli is not installed")
        pytest.skip("redis-server/redis-cli are not installed; Redis Cluster cases skipped")
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def redis_url(redis_server: RedisServer | None) -> str:
    """A Redis URL this test may flush: the private server, or CONVEYOR_TEST_REDIS_URL."""
    if redis_server is None:
        return os.environ["CONVEYOR_TEST_REDIS_URL"]
    if not redis_server.running:  # a previous test stopped it and failed before restarting
        redis_server.start()
    return redis_server.url


def flush_redis(url: str) -> None:
    """Empty the Redis database at ``url`` (tests only ever point at a disposable one)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test says so."""
    return FakeClock()


@pytest.fixture
def make_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Build (unconnected) brokers of a kind; ``make_broker(kind, **options)``."""

    def make(kind: str, **options: Any) -> Broker:
        if kind == "memory":
            return open_broker("memory://", **options)
        if kind == "sqlite":
            return open_broker(f"sqlite:///{tmp_path / 'conveyor.db'}", **options)
        if kind == "redis":
            url = request.getfixturevalue("redis_url")
            return open_broker(url, **options)
        if kind == "redis-cluster":  # only tests/conformance asks for it
            return open_broker(request.getfixturevalue("redis_cluster").url, **options)
        raise ValueError(kind)

    return make


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each broker kind in turn."""
    kind: str = request.param
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        flush_redis(url)
    return kind


@pytest.fixture
async def broker(
    broker_kind: str, make_broker: Callable[..., Broker], clock: FakeClock
) -> AsyncIterator[Broker]:
    """A connected broker of each kind, on the fake clock, closed after the test."""
    b = make_broker(broker_kind, clock=clock)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()
