"""Fixtures for the worker tests: an app on each broker kind (by URL, so the heartbeat thread can
open its own connection), and a helper that runs a worker for the length of a block."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# The worker tests import their helper modules by plain name (tests/worker is not a package),
# and spawned process children find them the same way.
_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def url_for(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """``url_for(kind)``: a broker URL of that kind, private to this test."""

    def make(kind: str) -> str:
        if kind == "memory":
            return "memory://"
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / 'worker.db'}"
        if kind == "redis":
            import redis

            url: str = request.getfixturevalue("redis_url")
            client = redis.Redis.from_url(url)
            try:
                client.flushdb()
            finally:
                client.close()
            return url
        raise ValueError(kind)

    return make


@pytest.fixture
def app_url(broker_kind: str, url_for: Callable[[str], str]) -> str:
    """A broker URL for each broker kind in turn (memory, sqlite, redis)."""
    return url_for(broker_kind)
