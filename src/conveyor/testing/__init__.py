"""Test support shipped with conveyor: a fake clock, a private redis-server, the conformance suite."""

from conveyor.clock import FakeClock
from conveyor.testing.redis_server import RedisServer, redis_server_binary

__all__ = ["FakeClock", "RedisServer", "redis_server_binary"]
