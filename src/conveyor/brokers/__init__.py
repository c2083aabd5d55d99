"""Broker selection: ``open_broker(url)`` maps a URL scheme to a broker class, importing it lazily.

* ``memory://`` - in-process (tests, single-process use)
* ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` - embedded, durable (the default)
* ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` - distributed
  (needs ``conveyor[redis]``)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from conveyor.brokers.base import Broker
from conveyor.errors import ConfigurationError, MissingDependencyError, UnknownSchemeError

__all__ = ["Broker", "open_broker"]

DEFAULT_URL = "sqlite:///conveyor.db"


def open_broker(url: str = DEFAULT_URL, **options: Any) -> Broker:
    """Build (but do not connect) the broker for ``url``; ``options`` go to its constructor."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"malformed broker URL {url!r}; expected SCHEME://..., e.g. sqlite:///conveyor.db, "
            "redis://localhost:6379/0 or memory://"
        )
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from conveyor.brokers.memory import MemoryBroker

        return MemoryBroker(**options)
    if scheme == "sqlite":
        from conveyor.brokers.sqlite import SQLiteBroker

        return SQLiteBroker.from_url(url, **options)
    if scheme in ("redis", "rediss"):
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "the Redis broker needs the redis package; pip install 'conveyor[redis]'"
            ) from None
        from conveyor.brokers.redis import RedisBroker

        return RedisBroker.from_url(url, **options)
    raise UnknownSchemeError(
        f"unknown broker URL scheme {scheme!r} in {url!r}; use memory://, sqlite:///PATH, "
        "redis://HOST:PORT/DB or rediss://HOST:PORT/DB"
    )
