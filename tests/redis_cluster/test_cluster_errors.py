"""Errors of a ``?cluster=true`` broker: a plain server, and a cluster that is not there."""

from __future__ import annotations

import pytest

from conveyor.brokers.redis import RedisBroker
from conveyor.errors import BrokerUnavailable, ConfigurationError
from conveyor.testing.redis_server import free_port

pytestmark = pytest.mark.redis


async def test_cluster_true_on_a_plain_server_is_a_configuration_error(redis_url: str) -> None:
    broker = RedisBroker(redis_url.split("?")[0] + "?cluster=true", connect_timeout_s=2.0)
    with pytest.raises(ConfigurationError, match="not a Redis Cluster node"):
        await broker.connect()
    await broker.close()


async def test_an_unreachable_cluster_is_unavailable() -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0?cluster=true", connect_timeout_s=1.0)
    with pytest.raises(BrokerUnavailable, match="Redis Cluster seeded by 127\\.0\\.0\\.1"):
        await broker.connect()
    await broker.close()
