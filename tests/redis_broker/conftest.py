"""Fixtures for the Redis-specific tests: a flushed session server, and private servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from conveyor.brokers.redis import RedisBroker
from conveyor.clock import FakeClock
from conveyor.testing.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.redis


def flush(url: str) -> None:
    """Empty the (disposable) database at ``url``."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
async def rbroker(redis_url: str, clock: FakeClock) -> AsyncIterator[RedisBroker]:
    """A connected RedisBroker on a flushed database and the fake clock."""
    flush(redis_url)
    broker = RedisBroker(redis_url, clock=clock)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client on the test database, to look at keys directly."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop, kill and restart."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
