"""A Redis at maxmemory (noeviction) refuses writes with a typed error that says why (B7)."""

from __future__ import annotations

import pytest
import redis

from conveyor import Conveyor
from conveyor.errors import BrokerReadOnly
from conveyor.testing.redis_server import RedisServer


@pytest.mark.redis
async def test_a_full_redis_is_read_only_until_it_has_room(
    redis_server: RedisServer | None,  # skips (or fails, when Redis is required) without one
) -> None:
    with RedisServer() as server:  # its own: the session server must keep its memory settings
        admin = redis.Redis(port=server.port)
        try:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)  # already over: every write is refused
            async with Conveyor(server.url) as app:
                with pytest.raises(BrokerReadOnly, match="out of memory") as refused:
                    await app.enqueue("chaos.anything", args=[1])
                assert "maxmemory" in refused.value.message
                assert admin.dbsize() == 0  # nothing half-written
                admin.config_set("maxmemory", 0)
                handle = await app.enqueue("chaos.anything", args=[1])
                job = await app.get_job(handle.id)
                assert job is not None
                assert job.args == [1]
        finally:
            admin.close()
