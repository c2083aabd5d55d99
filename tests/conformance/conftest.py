"""The conformance suite also runs on a 3-master Redis Cluster (broker kind ``redis-cluster``).

Only here: the other test areas keep the root ``broker_kind`` and its kinds. This fixture
overrides it for tests/conformance with one more kind; ``make_broker`` (root) builds each.
"""

from __future__ import annotations

import pytest
import redis

#: The root conftest's BROKER_KINDS, plus the cluster.
CONFORMANCE_KINDS = ["memory", "sqlite", "redis", "redis-cluster"]


@pytest.fixture(params=CONFORMANCE_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each broker kind in turn, a Redis one emptied first."""
    kind: str = request.param
    if kind == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        try:
            client.flushdb()
        finally:
            client.close()
    elif kind == "redis-cluster":
        request.getfixturevalue("redis_cluster").flush()
    return kind
