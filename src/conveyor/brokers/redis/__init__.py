"""The Redis broker (``redis://``, ``rediss://``): many workers, many machines, Cluster-safe."""

from conveyor.brokers.redis.broker import RedisBroker

__all__ = ["RedisBroker"]
