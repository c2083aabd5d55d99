"""Test support shipped with conveyor: a fake clock and a private redis-server."""

from conveyor.clock import FakeClock
from conveyor.testing.redis_server import RedisServer, redis_server_binary

__all__ = ["FakeClock", "RedisServer", "redis_server_binary"]
