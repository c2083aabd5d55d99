"""Blocking reads of the Redis broker: the job event stream and the fetcher's wake-ups.

Events: each queue has a capped stream (``{P:Q}:events``) that the scripts append to, with ids
``<server time in µs>-<n>`` that never go backwards. Scripts run one at a time, so the ids of all
streams on a server form one order, and a single id is a position in every stream: a subscriber
follows one queue or all of them (the queue set is re-read every second to pick up new queues)
with one cursor, blocks in XREAD, and yields events merged in id order. ``JobEvent.id`` is the
stream id; resuming after it replays exactly what followed, within retention. A subscriber
survives outages: it backs off, reconnects and continues from the last id it delivered. It ends
when the broker is closed.

Wake-ups: scripts that make jobs reservable push tokens on ``{P:Q}:notify``; ``wait_for_jobs``
BLPOPs those lists, never longer than until the earliest scheduled job is due, on a connection
of its own from the pool (a blocked command holds its connection).

Redis Cluster: the queues' keys live in different slots, so one command cannot name several
queues. With ``multi_queue_commands`` off, a wait issues one BLPOP per queue concurrently and the
first reply wins. A subscription then follows each queue's stream from a position of its own
(reading them all without blocking, and blocking on them all only when none has news), so no
event is skipped because another master answered first; each queue's events keep their order,
but the order across queues (and a cursor resumed across queues) is only as good as the
masters' clock sync.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from conveyor.brokers.base import EventKind, JobEvent
from conveyor.brokers.redis.records import text
from conveyor.errors import BrokerError, BrokerUnavailable, InvalidJobError
from conveyor.job import JobState

if TYPE_CHECKING:
    from conveyor.brokers.redis.broker import RedisBroker

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_STREAM_ID: Final = re.compile(r"^\d+-\d+$")
#: How often an all-queues subscription re-reads the queue set.
QUEUE_REFRESH_S: Final = 1.0
READ_COUNT: Final = 512
MAX_BACKOFF_S: Final = 2.0


def block_slice_s(broker: RedisBroker) -> float:
    """The longest single blocking command: well inside the socket timeout."""
    return max(0.05, broker.options.socket_timeout_s * 0.8)


# -- wake-ups ------------------------------------------------------------------------------------


async def wait_for_jobs(broker: RedisBroker, queues: Sequence[str], timeout_s: float) -> None:
    """Return when a job may be reservable on one of ``queues``, or after ``timeout_s``."""
    if timeout_s <= 0 or broker.is_closed():
        return
    if not queues:
        await asyncio.sleep(timeout_s)
        return
    keys = [broker.queue_keys(queue) for queue in queues]
    now = broker.clock.now_ms()
    try:
        with broker.boundary("wait_for_jobs"):
            async with broker.redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.zcard(k.states[JobState.QUEUED])
                    pipe.zrange(k.states[JobState.SCHEDULED], 0, 0, withscores=True)
                replies = await pipe.execute()
            wait = min(timeout_s, block_slice_s(broker))
            for i in range(len(keys)):
                if replies[2 * i]:
                    return  # work is already waiting
                for _, run_at in replies[2 * i + 1]:
                    # With a FakeClock this is fake time read as a real wait: still a valid bound.
                    wait = min(wait, (run_at - now) / 1000)
            if wait < 0.001:
                return  # a scheduled job is due (and BLPOP 0 would block for ever)
            notify = [k.notify for k in keys]
            if broker.multi_queue_commands or len(notify) == 1:
                await broker.redis.blpop(notify, timeout=wait)
            else:
                await _first([broker.redis.blpop([key], timeout=wait) for key in notify])
    except BrokerError:
        if broker.is_closed():
            return  # close() cut the blocked command: the wait is over
        raise


async def _first(calls: Sequence[Awaitable[_T]]) -> list[_T]:
    """Run ``calls`` concurrently until the first finishes; cancel the rest; its results."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [task.result() for task in tasks if task in done]


# -- events --------------------------------------------------------------------------------------


def check_cursor(after: str | None) -> str | None:
    """Validate a subscription cursor (a stream id this broker produced)."""
    if after is not None and not _STREAM_ID.match(after):
        raise InvalidJobError(
            f"invalid event cursor {after!r}; pass the id of an event this broker produced"
        )
    return after


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _decode_event(stream_id: str, queue: str, fields: dict[bytes, bytes]) -> JobEvent:
    f = {key.decode(): value.decode() for key, value in fields.items()}
    state = f.get("s")
    attempts = f.get("a")
    progress = f.get("p")
    return JobEvent(
        id=stream_id,
        kind=EventKind(f["k"]),
        job_id=f["j"],
        queue=queue,
        ts_ms=int(f["ts"]),
        state=JobState(state) if state else None,
        transition=f.get("x"),
        task=f.get("t"),
        attempts=int(attempts) if attempts is not None else None,
        progress=int(progress) if progress is not None else None,
        description=f.get("d"),
        line=f.get("l"),
        error=f.get("e"),
    )


async def subscribe(
    broker: RedisBroker, *, queue: str | None, job_id: str | None, after: str | None
) -> AsyncIterator[JobEvent]:
    """Yield events of one queue, one job or everything, resuming after outages; see module."""
    position = after or ""  # the id of the last event delivered (or skipped by the filter)
    followed: list[str] = []
    stream_at: dict[str, str] = {}  # Redis Cluster: queue -> the last id read from its stream
    fixed = queue
    started = False
    refresh_at = 0.0
    backoff = 0.1
    loop = asyncio.get_running_loop()
    while not broker.is_closed():
        try:
            if not started:
                if fixed is None and job_id is not None:
                    with broker.boundary("subscribe"):
                        fixed = await broker.queue_of(job_id)  # else: follow every queue
                if not position:
                    position = await _server_now(broker)
                started = True
            if fixed is not None:
                followed = [fixed]
            elif loop.time() >= refresh_at:
                followed = sorted(await _queue_names(broker))
                refresh_at = loop.time() + QUEUE_REFRESH_S
            entries, position = await _next(broker, followed, position, stream_at)
            backoff = 0.1
        except BrokerError as exc:
            if broker.is_closed():
                return
            if not isinstance(exc, BrokerUnavailable):
                raise
            logger.warning(
                "event stream: %s; retrying in %.1f s",
                exc,
                backoff,
                extra={"action": "subscribe", "queue": fixed},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            continue
        for stream_id, stream_queue, fields in entries:
            if job_id is None or fields.get(b"j", b"").decode() == job_id:
                yield _decode_event(stream_id, stream_queue, fields)


async def _queue_names(broker: RedisBroker) -> list[str]:
    with broker.boundary("subscribe"):
        return await broker.queue_names()


async def _server_now(broker: RedisBroker) -> str:
    """The position "now" in every stream: the server's time in µs (see the module)."""
    with broker.boundary("subscribe"):
        seconds, micros = await broker.redis.time()
    return f"{seconds * 1_000_000 + micros}-0"


async def _read(
    broker: RedisBroker, queues: list[str], position: str
) -> tuple[list[tuple[str, str, dict[bytes, bytes]]], str]:
    """One XREAD of every stream after ``position``: (id, queue, fields) in id order, position.

    When a stream hit the read count, entries past its last one are held back (and read again
    next time), so the new position never skips an event another stream has not returned yet.
    """
    block_ms = max(1, int(min(1.0, block_slice_s(broker)) * 1000))
    if not queues:
        await asyncio.sleep(block_ms / 1000)
        return [], position
    by_key = {broker.queue_keys(name).events: name for name in queues}
    streams: dict[Any, Any] = dict.fromkeys(by_key, position)
    with broker.boundary("subscribe"):
        reply: Any = await broker.redis.xread(streams, count=READ_COUNT, block=block_ms)
    merged: list[tuple[str, str, dict[bytes, bytes]]] = []
    limit: tuple[int, int] | None = None
    for raw_key, items in reply or []:
        name = by_key[text(raw_key)]
        for raw_id, fields in items:
            merged.append((text(raw_id), name, fields))
        if len(items) >= READ_COUNT:
            last = _id_key(text(items[-1][0]))
            limit = last if limit is None else min(limit, last)
    merged.sort(key=lambda entry: _id_key(entry[0]))
    if limit is not None:
        merged = [entry for entry in merged if _id_key(entry[0]) <= limit]
    return merged, (merged[-1][0] if merged else position)


async def _next(
    broker: RedisBroker, queues: list[str], position: str, stream_at: dict[str, str]
) -> tuple[list[tuple[str, str, dict[bytes, bytes]]], str]:
    """The next entries and position: one XREAD, or on Redis Cluster one per queue.

    On a cluster ``position`` stays put (where queues found later start); ``stream_at`` moves.
    """
    if broker.multi_queue_commands:
        return await _read(broker, queues, position)
    return await _read_each(broker, queues, position, stream_at), position


async def _read_each(
    broker: RedisBroker, queues: list[str], start: str, stream_at: dict[str, str]
) -> list[tuple[str, str, dict[bytes, bytes]]]:
    """Redis Cluster: each queue's stream after its own position; (id, queue, fields) in id order.

    A queue's position is ``stream_at[queue]`` (else ``start``), advanced past what is returned.

    First without blocking, all queues at once; only when none has news, one blocking XREAD per
    queue until the first answers (the others are cancelled and read again next time).
    """
    block_ms = max(1, int(min(1.0, block_slice_s(broker)) * 1000))
    if not queues:
        await asyncio.sleep(block_ms / 1000)
        return []
    by_key = {broker.queue_keys(name).events: name for name in queues}

    def read(key: str, block: int | None) -> Awaitable[Any]:
        # The raw command, not client.xread(): that wraps its command in a second coroutine,
        # which is never awaited (a RuntimeWarning) when the read is cancelled before it runs.
        after = stream_at.get(by_key[key], start)
        blocking = () if block is None else ("BLOCK", block)
        return client.execute_command(
            "XREAD", "COUNT", READ_COUNT, *blocking, "STREAMS", key, after
        )

    with broker.boundary("subscribe"):
        client = broker.redis  # once: a close() between two reads must not strand a coroutine
        replies: list[Any] = list(await asyncio.gather(*(read(key, None) for key in by_key)))
        if not any(replies):
            replies = await _first([read(key, block_ms) for key in by_key])
    merged: list[tuple[str, str, dict[bytes, bytes]]] = []
    for reply in replies:
        for raw_key, items in reply or []:
            name = by_key[text(raw_key)]
            merged += [(text(raw_id), name, fields) for raw_id, fields in items]
            if items:
                stream_at[name] = text(items[-1][0])
    merged.sort(key=lambda entry: _id_key(entry[0]))
    return merged
