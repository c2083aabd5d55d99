"""Redis-specific behaviour: batching limits, the global index, encodings, wake-ups and events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from conveyor.brokers.base import JobEvent
from conveyor.brokers.redis import RedisBroker
from conveyor.clock import FakeClock
from conveyor.codec import Codec
from conveyor.errors import InvalidJobError, JobNotFound
from conveyor.job import Job, JobState, new_job_id

pytestmark = pytest.mark.redis


def job(queue: str = "q", **fields: Any) -> Job:
    return Job(id=new_job_id(), task="t", queue=queue, **fields)


# -- batches larger than one script call ---------------------------------------------------------


async def test_batches_larger_than_one_script_call_are_split(rbroker: RedisBroker) -> None:
    jobs = [job(dedup_key="k" if i in (10, 1500) else None) for i in range(2500)]

    ids = await rbroker.enqueue(jobs)
    reserved = await rbroker.reserve("q", 2400, lease_s=30)
    acked = await rbroker.ack_many([(j.lease, None) for j in reserved])

    # a dedup key collapses across the chunk boundary too
    assert ids[1500] == jobs[10].id
    assert len(reserved) == 2400
    assert [j.id for j in reserved[:3]] == [jobs[0].id, jobs[1].id, jobs[2].id]
    assert all(acked)
    assert (await rbroker.counts("q"))["q"][JobState.QUEUED] == 2499 - 2400


async def test_ack_many_acks_a_lease_given_twice_once(rbroker: RedisBroker) -> None:
    await rbroker.enqueue([job()])
    [reserved] = await rbroker.reserve("q", 1, lease_s=30)

    assert await rbroker.ack_many([(reserved.lease, 1), (reserved.lease, 2)]) == [True, False]
    stored = await rbroker.get(reserved.id)
    assert stored is not None
    assert (stored.attempts, stored.result) == (1, 1)


async def test_ack_many_spans_queues(rbroker: RedisBroker) -> None:
    await rbroker.enqueue([job("a"), job("b")])
    a = await rbroker.reserve("a", 1, lease_s=30)
    b = await rbroker.reserve("b", 1, lease_s=30)

    assert await rbroker.ack_many([(b[0].lease, "b"), (a[0].lease, "a")]) == [True, True]
    assert (await rbroker.get(a[0].id)).result == "a"  # type: ignore[union-attr]


# -- the global index ----------------------------------------------------------------------------


async def test_a_dangling_index_entry_reads_as_not_found_and_frees_its_id(
    rbroker: RedisBroker, raw: Any
) -> None:
    # What a crash between index_jobs and enqueue leaves behind.
    raw.hset(rbroker.global_keys.index, "ghost", "elsewhere")

    assert await rbroker.get("ghost") is None
    with pytest.raises(JobNotFound):
        await rbroker.cancel("ghost")
    assert await rbroker.enqueue([Job(id="ghost", task="t", queue="q")]) == ["ghost"]
    assert raw.hget(rbroker.global_keys.index, "ghost") == b"q"


async def test_a_deduplicated_job_leaves_no_index_entry(rbroker: RedisBroker, raw: Any) -> None:
    first, dup = job(dedup_key="k"), job(dedup_key="k")

    assert await rbroker.enqueue([first, dup]) == [first.id, first.id]
    assert raw.hexists(rbroker.global_keys.index, first.id)
    assert not raw.hexists(rbroker.global_keys.index, dup.id)


async def test_a_refused_batch_leaves_no_index_entries(rbroker: RedisBroker, raw: Any) -> None:
    existing = job()
    await rbroker.enqueue([existing])
    fresh = job()

    with pytest.raises(InvalidJobError, match="already in use"):
        await rbroker.enqueue([fresh, Job(id=existing.id, task="t", queue="other")])
    with pytest.raises(InvalidJobError, match="already in use"):
        await rbroker.enqueue([fresh, Job(id=existing.id, task="t", queue="q")])

    assert not raw.hexists(rbroker.global_keys.index, fresh.id)
    assert raw.hget(rbroker.global_keys.index, existing.id) == b"q"
    assert await rbroker.get(fresh.id) is None


@pytest.mark.parametrize("one_step", [True, False], ids=["single-server", "cluster-two-steps"])
async def test_both_enqueue_paths_index_store_and_deduplicate_alike(
    rbroker: RedisBroker, raw: Any, one_step: bool
) -> None:
    rbroker.multi_queue_commands = one_step  # False: as on Redis Cluster (index, then enqueue)
    first, dup, later = job(dedup_key="k"), job(dedup_key="k"), job(run_at_ms=2**41)

    assert await rbroker.enqueue([first, dup, later]) == [first.id, first.id, later.id]

    index = rbroker.global_keys.index
    assert raw.hget(index, first.id) == b"q"
    assert raw.hget(index, later.id) == b"q"
    assert not raw.hexists(index, dup.id)
    assert raw.sismember(rbroker.global_keys.queues, "q")
    assert (await rbroker.get(later.id)).state == JobState.SCHEDULED  # type: ignore[union-attr]
    [reserved] = await rbroker.reserve("q", 5, lease_s=30)
    assert reserved.id == first.id
    with pytest.raises(InvalidJobError, match="already in use"):
        await rbroker.enqueue([job(), Job(id=first.id, task="t", queue="q")])
    assert raw.hlen(index) == 2


async def test_prefixes_keep_brokers_apart(redis_url: str, rbroker: RedisBroker) -> None:
    other = RedisBroker(redis_url, prefix="other-app")
    async with other:
        [mine] = await rbroker.enqueue([job()])
        assert await other.get(mine) is None
        assert await other.queues() == []
        assert await other.reserve("q", 10, lease_s=30) == []


# -- encodings -----------------------------------------------------------------------------------


async def test_the_msgpack_codec_round_trips_binary_records(
    redis_url: str, clock: FakeClock
) -> None:
    broker = RedisBroker(redis_url, clock=clock, codec=Codec("msgpack"), prefix="mp")
    async with broker:
        payload = {"n": 2**40, "s": "naïve ✓", "f": 1.5, "l": [], "d": {}}
        [job_id] = await broker.enqueue([job(kwargs=payload)])
        [reserved] = await broker.reserve("q", 1, lease_s=30)
        await broker.ack(reserved.lease, {"bytes-ish": "\x00\xff", "big": 2**60})

        stored = await broker.get(job_id)
        assert stored is not None
        assert stored.kwargs == payload
        assert stored.result == {"bytes-ish": "\x00\xff", "big": 2**60}


async def test_payloads_that_json_in_lua_would_mangle_round_trip(rbroker: RedisBroker) -> None:
    args = [2**53 + 1, 0.1 + 0.2, [], {}, "a/b", "\u2028"]
    [job_id] = await rbroker.enqueue([job(args=args)])
    [reserved] = await rbroker.reserve("q", 1, lease_s=30)

    assert reserved.args == args
    assert (await rbroker.get(job_id)).args == args  # type: ignore[union-attr]


# -- logs and events retention -------------------------------------------------------------------


async def test_logs_keep_the_newest_lines_and_count_the_rest(redis_url: str) -> None:
    broker = RedisBroker(redis_url, max_log_lines=3, prefix="logs")
    async with broker:
        await broker.enqueue([job()])
        [reserved] = await broker.reserve("q", 1, lease_s=30)
        await broker.append_log(reserved.lease, ["1", "2"])
        await broker.append_log(reserved.lease, ["3", "4", "5"])

        page = await broker.logs(reserved.id)
        assert (page.lines, page.dropped, page.total) == (["3", "4", "5"], 2, 3)
        assert (await broker.logs(reserved.id, offset=1, limit=1)).lines == ["4"]
        assert (await broker.logs(reserved.id, limit=0)).lines == []


async def test_the_event_stream_is_capped_near_the_retention(redis_url: str, raw: Any) -> None:
    broker = RedisBroker(redis_url, event_retention=100, prefix="cap")
    async with broker:
        for _ in range(10):
            await broker.enqueue([job() for _ in range(100)])

        assert raw.xlen(broker.queue_keys("q").events) < 400  # approximate trimming (~)


# -- wake-ups ------------------------------------------------------------------------------------


async def test_wait_for_jobs_wakes_at_the_earliest_scheduled_job(
    rbroker: RedisBroker, clock: FakeClock
) -> None:
    await rbroker.enqueue([job(run_at_ms=clock.now_ms() + 300)])
    started = time.monotonic()

    await rbroker.wait_for_jobs(["q"], timeout_s=10)

    assert 0.2 < time.monotonic() - started < 3


async def test_wake_up_tokens_are_capped_and_dropped_when_the_queue_drains(
    rbroker: RedisBroker, raw: Any
) -> None:
    for _ in range(3):
        await rbroker.enqueue([job() for _ in range(100)])
    assert raw.llen(rbroker.queue_keys("q").notify) <= 64

    await rbroker.reserve("q", 300, lease_s=30)

    assert raw.llen(rbroker.queue_keys("q").notify) == 0


async def test_several_queues_are_watched_one_by_one_when_commands_cannot_span_queues(
    rbroker: RedisBroker,
) -> None:
    rbroker.multi_queue_commands = False  # as on Redis Cluster
    waiter = asyncio.create_task(rbroker.wait_for_jobs(["a", "b", "c"], timeout_s=30))
    await asyncio.sleep(0.1)

    await rbroker.enqueue([job("c")])

    async with asyncio.timeout(5):
        await waiter


# -- events --------------------------------------------------------------------------------------


async def _collect(stream: Any, into: list[JobEvent]) -> None:
    async for event in stream:
        into.append(event)


async def _wait(events: list[JobEvent], n: int) -> None:
    async with asyncio.timeout(5):
        while len(events) < n:
            await asyncio.sleep(0.01)


async def _live(broker: RedisBroker, **filters: Any) -> tuple[asyncio.Task[None], list[JobEvent]]:
    """A subscription that is known to be live (a probe job's event came through)."""
    events: list[JobEvent] = []
    task = asyncio.create_task(_collect(broker.subscribe(**filters), events))
    queue = filters.get("queue", "probe")
    async with asyncio.timeout(5):
        while not events:
            [probe] = await broker.enqueue([job(queue)])
            await asyncio.sleep(0.05)
    await broker.delete(probe)
    await _wait(events, 2)
    events.clear()
    return task, events


async def test_events_of_all_queues_arrive_in_one_order_and_resume_from_any_cursor(
    rbroker: RedisBroker,
) -> None:
    task, events = await _live(rbroker)
    try:
        ids = []
        for queue in ["a", "b", "a", "c", "b"]:
            ids += await rbroker.enqueue([job(queue)])
        await _wait(events, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [e.job_id for e in events] == ids
    cursors = [tuple(int(p) for p in e.id.split("-")) for e in events]
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == 5

    # A cursor is a position in every queue's stream: resume after the 2nd event.
    resumed: list[JobEvent] = []
    task = asyncio.create_task(_collect(rbroker.subscribe(after=events[1].id), resumed))
    try:
        await _wait(resumed, 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [e.job_id for e in resumed] == ids[2:]


async def test_event_ids_never_go_back_even_when_the_server_clock_does(
    rbroker: RedisBroker, raw: Any
) -> None:
    # An entry stamped far ahead stands for a clock that went back since it was written:
    # XADD refuses TIME-based ids below it, so the scripts continue after the stream's last id.
    [first] = await rbroker.enqueue([job()])
    events_key = rbroker.queue_keys("q").events
    ahead_us = (time.time_ns() // 1000) + 3_600_000_000
    raw.xadd(events_key, {"k": "probe"}, id=f"{ahead_us}-0")

    [second] = await rbroker.enqueue([job()])
    [reserved] = await rbroker.reserve("q", 1, lease_s=30)

    entries = [
        (tuple(int(part) for part in raw_id.decode().split("-")), fields)
        for raw_id, fields in raw.xrange(events_key)
    ]
    ids = [entry_id for entry_id, _ in entries]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    later = [f[b"j"].decode() for (us, _), f in entries if us == ahead_us and b"j" in f]
    assert later == [second, first]  # enqueue of the second job, then the reserve of the first
    assert reserved.id == first


async def test_a_bad_cursor_is_refused_at_once(rbroker: RedisBroker) -> None:
    with pytest.raises(InvalidJobError, match="cursor"):
        rbroker.subscribe(after="not-a-cursor")


async def test_a_subscription_to_a_job_follows_only_that_job(rbroker: RedisBroker) -> None:
    [mine, other] = await rbroker.enqueue([job(), job()])
    events: list[JobEvent] = []
    task = asyncio.create_task(_collect(rbroker.subscribe(job_id=mine, after="0-0"), events))
    try:
        await rbroker.cancel(other)
        await rbroker.cancel(mine)
        await _wait(events, 2)
        await asyncio.sleep(0.1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(e.job_id, e.transition) for e in events] == [(mine, "enqueue"), (mine, "cancel")]


# -- cancellation --------------------------------------------------------------------------------


async def test_a_cancellation_swallowed_inside_the_boundary_is_raised_again(
    rbroker: RedisBroker,
) -> None:
    # redis-py sends under asyncio.wait_for, which before Python 3.12 can swallow a cancel.
    async def swallowing_call() -> None:
        with rbroker.boundary("test"):
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)  # the cancel lands here and is swallowed
        raise AssertionError("the boundary should have raised CancelledError")

    task = asyncio.create_task(swallowing_call())
    with pytest.raises(asyncio.CancelledError):
        await task
