"""Connections: URLs, secrets, error translation, and outages (fail fast, then work again)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from redis import exceptions as redis_errors

from conveyor.brokers import open_broker
from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis.connection import parse_url, translate_errors
from conveyor.errors import (
    BrokerError,
    BrokerReadOnly,
    BrokerUnavailable,
    ConfigurationError,
    JobNotFound,
)
from conveyor.job import Job, new_job_id
from conveyor.testing.redis_server import RedisServer, free_port

pytestmark = pytest.mark.redis

SECRET = "s3cr3t-Pa55"
#: Outage calls must fail within this (the broker's timeouts are 1 s in these tests).
FAST_S = 3.0


def job(queue: str = "q") -> Job:
    return Job(id=new_job_id(), task="t", queue=queue)


# -- URLs and secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "where", "db", "tls"),
    [
        ("redis://localhost", "localhost:6379", 0, False),
        ("redis://h:6380/2", "h:6380", 2, False),
        (f"redis://user:{SECRET}@h:1/3", "h:1", 3, False),
        ("rediss://h:6390/0?ssl_cert_reqs=none", "h:6390", 0, True),
        ("redis://[::1]:7000/1", "[::1]:7000", 1, False),
    ],
)
def test_urls_are_parsed(url: str, where: str, db: int, tls: bool) -> None:
    address = parse_url(url)
    assert (address.where, address.db, address.tls) == (where, db, tls)


@pytest.mark.parametrize(
    "url",
    [
        "redis://host:notaport",
        f"redis://user:{SECRET}@host:notaport/0",
        "redis://host:6379/notadb",
        "redis:///0",
        "http://host:6379",
        "redis://host:99999",
    ],
)
def test_a_malformed_url_is_a_configuration_error_that_never_echoes_the_password(
    url: str,
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RedisBroker(url)
    assert SECRET not in str(raised.value)


def test_open_broker_builds_a_redis_broker_and_rejects_a_bad_port() -> None:
    assert isinstance(open_broker("redis://localhost:6379/0"), RedisBroker)
    with pytest.raises(ConfigurationError):
        open_broker("redis://host:notaport")


def test_repr_hides_the_password() -> None:
    broker = RedisBroker(f"redis://admin:{SECRET}@127.0.0.1:6390/4")
    assert SECRET not in repr(broker)
    assert repr(broker) == "RedisBroker('redis://admin:***@127.0.0.1:6390/4', prefix='conveyor')"


def test_rediss_builds_a_tls_connection_pool() -> None:
    from redis.asyncio.connection import SSLConnection

    from conveyor.brokers.redis.connection import RedisOptions, make_client

    client = make_client(parse_url("rediss://h:6390/0?ssl_cert_reqs=none"), RedisOptions())
    assert client.connection_pool.connection_class is SSLConnection


def test_bad_timeouts_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="socket_timeout_s"):
        RedisBroker("redis://h", socket_timeout_s=0)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (redis_errors.ConnectionError("refused"), BrokerUnavailable),
        (redis_errors.TimeoutError("slow"), BrokerUnavailable),
        (redis_errors.BusyLoadingError("loading"), BrokerUnavailable),
        (ConnectionResetError("reset"), BrokerUnavailable),
        (TimeoutError(), BrokerUnavailable),
        (redis_errors.AuthenticationError("invalid password"), ConfigurationError),
        (redis_errors.NoPermissionError("NOPERM"), ConfigurationError),
        (redis_errors.ReadOnlyError("READONLY"), BrokerReadOnly),
        (redis_errors.ResponseError("OOM"), BrokerError),
        (redis_errors.DataError("bad"), BrokerError),
    ],
)
def test_driver_exceptions_are_translated(raised: Exception, expected: type[Exception]) -> None:
    address = parse_url(f"redis://u:{SECRET}@db.example:6379/0")
    with pytest.raises(expected) as caught, translate_errors("ack", address):
        raise raised
    assert type(caught.value) is expected
    assert "ack" in str(caught.value)
    assert "db.example:6379" in str(caught.value) or expected is not BrokerUnavailable
    assert SECRET not in str(caught.value)


# -- unreachable, wrong credentials, read-only ----------------------------------------------------


async def test_an_unreachable_redis_at_connect_fails_fast_naming_host_and_port() -> None:
    port = free_port()
    broker = RedisBroker(f"redis://u:{SECRET}@127.0.0.1:{port}/0", connect_timeout_s=1)
    started = time.monotonic()

    with pytest.raises(BrokerUnavailable) as raised:
        await broker.connect()

    assert time.monotonic() - started < FAST_S
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "running" in str(raised.value)  # says what to do
    assert SECRET not in str(raised.value)
    await broker.close()


async def test_a_wrong_password_is_a_configuration_error_without_the_password(
    private_server: RedisServer,
) -> None:
    import redis

    # RedisServer.start() checks readiness with a bare PING, so the password is set afterwards.
    admin = redis.Redis(port=private_server.port)
    admin.config_set("requirepass", "right-one")
    admin.close()
    base = f"127.0.0.1:{private_server.port}/0"

    wrong = RedisBroker(f"redis://:{SECRET}@{base}")
    with pytest.raises(ConfigurationError) as raised:
        await wrong.connect()
    assert SECRET not in str(raised.value)
    assert "password" in str(raised.value)
    await wrong.close()

    right = RedisBroker(f"redis://:right-one@{base}")
    async with right:
        await right.enqueue([job()])


async def test_writes_to_a_read_only_replica_raise_broker_read_only(
    private_server: RedisServer,
) -> None:
    with RedisServer(extra_args=["--replicaof", "127.0.0.1", str(private_server.port)]) as replica:
        broker = RedisBroker(replica.url)
        async with broker:
            with pytest.raises(BrokerReadOnly, match="primary"):
                await broker.enqueue([job()])


# -- outages --------------------------------------------------------------------------------------


async def _fails_fast(call: Any) -> BrokerUnavailable:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        async with asyncio.timeout(FAST_S * 2):
            await call
    assert time.monotonic() - started < FAST_S
    return raised.value


async def test_calls_fail_fast_while_redis_is_down_and_work_again_once_it_is_back(
    private_server: RedisServer,
) -> None:
    broker = RedisBroker(
        private_server.url, socket_timeout_s=1, connect_timeout_s=1, health_check_interval_s=1
    )
    async with broker:
        [before] = await broker.enqueue([job()])
        private_server.stop()

        error = await _fails_fast(broker.enqueue([job()]))
        assert f"127.0.0.1:{private_server.port}" in str(error)
        await _fails_fast(broker.reserve("q", 10, lease_s=30))
        await _fails_fast(broker.get(before))
        await _fails_fast(broker.ping())
        await _fails_fast(broker.wait_for_jobs(["q"], timeout_s=30))
        await _fails_fast(broker.counts())

        private_server.start()  # same port, empty (no persistence), no scripts loaded

        await broker.ping()
        [after] = await broker.enqueue([job()])
        [reserved] = await broker.reserve("q", 10, lease_s=30)
        assert reserved.id == after
        await broker.ack(reserved.lease)
        with pytest.raises(JobNotFound):
            await broker.cancel(before)  # lost with the server's memory


async def test_a_call_in_flight_when_redis_dies_fails_fast(private_server: RedisServer) -> None:
    broker = RedisBroker(private_server.url, socket_timeout_s=1, connect_timeout_s=1)
    async with broker:
        waiter = asyncio.create_task(broker.wait_for_jobs(["q"], timeout_s=30))
        await asyncio.sleep(0.2)  # blocked in BLPOP
        private_server.kill()

        await _fails_fast(waiter)


async def _collect(broker: RedisBroker, seen: set[str]) -> None:
    async for event in broker.subscribe(queue="q"):
        seen.add(event.job_id)


async def _until_delivered(broker: RedisBroker, seen: set[str], timeout_s: float = 5) -> None:
    """Enqueue probes until one shows up in ``seen`` (a subscription goes live asynchronously)."""
    async with asyncio.timeout(timeout_s):
        while True:
            probe = job()
            with contextlib.suppress(BrokerUnavailable):  # the server may still be starting
                await broker.enqueue([probe])
            for _ in range(20):
                if probe.id in seen:
                    return
                await asyncio.sleep(0.05)


async def test_a_subscription_survives_a_restart_and_continues(
    private_server: RedisServer,
) -> None:
    broker = RedisBroker(private_server.url, socket_timeout_s=1, connect_timeout_s=1)
    async with broker:
        seen: set[str] = set()
        consumer = asyncio.create_task(_collect(broker, seen))
        try:
            await _until_delivered(broker, seen)

            private_server.stop()
            await asyncio.sleep(0.5)  # the subscriber meets the outage and backs off
            private_server.start()

            await _until_delivered(broker, seen, timeout_s=10)
            assert not consumer.done()
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)


async def test_close_ends_subscriptions_and_waits(private_server: RedisServer) -> None:
    broker = RedisBroker(private_server.url)
    await broker.connect()
    stream = broker.subscribe()
    reader = asyncio.create_task(anext(stream, None))
    waiter = asyncio.create_task(broker.wait_for_jobs(["q"], timeout_s=30))
    await asyncio.sleep(0.2)

    await broker.close()

    async with asyncio.timeout(FAST_S):
        assert await reader is None
        await waiter
    await broker.close()  # idempotent
