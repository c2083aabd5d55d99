"""Reads of the Redis broker: one job, pages of jobs, counts and logs (no script needed).

Multi-key reads of one queue run in a MULTI/EXEC pipeline, so they see one consistent moment
(all keys of a queue share a slot, which Redis Cluster also allows).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from conveyor.brokers.base import JobPage, LogPage, all_states_zero
from conveyor.brokers.redis.keys import STATE_ORDER, QueueKeys
from conveyor.brokers.redis.records import build_job, decode_meta, text
from conveyor.errors import ErrorCode, InvalidJobError, error_for_code
from conveyor.job import Job, JobState

if TYPE_CHECKING:
    from conveyor.brokers.redis.broker import RedisBroker

MAX_PAGE = 1000


async def get(broker: RedisBroker, job_id: str) -> Job | None:
    """The job with this id, or None (also for an index entry whose job is gone)."""
    with broker.boundary("get"):
        queue = await broker.queue_of(job_id)
        if queue is None:
            return None
        keys = broker.queue_keys(queue)
        async with broker.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.jobs, job_id)
            pipe.hget(keys.meta, job_id)
            pipe.hget(keys.results, job_id)
            record, meta, result = await pipe.execute()
    if record is None or meta is None:
        return None
    return build_job(broker.codec, record, meta, result)


async def logs(
    broker: RedisBroker, job_id: str, *, offset: int = 0, limit: int | None = None
) -> LogPage:
    """A job's kept log lines from ``offset`` (0 = oldest kept); JobNotFound if it is gone.

    ``total`` counts the kept lines; ``dropped`` the older ones the cap discarded.
    """
    if offset < 0 or (limit is not None and limit < 0):
        raise InvalidJobError("logs offset and limit must be >= 0")
    with broker.boundary("logs"):
        queue = await broker.queue_of(job_id)
        if queue is None:
            raise error_for_code(ErrorCode.JOB_NOT_FOUND, action="logs", job_id=job_id)
        keys = broker.queue_keys(queue)
        end = -1 if limit is None else offset + limit - 1
        async with broker.redis.pipeline(transaction=True) as pipe:
            # HSTRLEN, not HEXISTS: redis-py's cluster MULTI/EXEC (8.1) fails on HEXISTS's reply
            # callback; a meta entry is never empty, so a length of 0 means "no such job".
            pipe.hstrlen(keys.meta, job_id)
            pipe.lrange(keys.log(job_id), offset, end)
            pipe.hget(keys.logmeta, job_id)
            pipe.llen(keys.log(job_id))
            exists, lines, dropped_raw, kept = await pipe.execute()
    if not exists:
        raise error_for_code(ErrorCode.JOB_NOT_FOUND, action="logs", job_id=job_id)
    if limit == 0:
        lines = []  # LRANGE offset offset-1 would mean "to the end" for offset 0
    return LogPage(
        lines=[text(line) for line in lines], dropped=int(dropped_raw or 0), total=int(kept)
    )


async def counts(broker: RedisBroker, queue: str | None) -> dict[str, dict[JobState, int]]:
    """Per queue, jobs in each state (the cardinality of each state zset)."""
    with broker.boundary("counts"):
        names = [queue] if queue is not None else sorted(await broker.queue_names())
        async with broker.redis.pipeline(transaction=False) as pipe:
            for name in names:
                keys = broker.queue_keys(name)
                for state in STATE_ORDER:
                    pipe.zcard(keys.states[state])
            sizes = await pipe.execute()
    out: dict[str, dict[JobState, int]] = {}
    width = len(STATE_ORDER)
    for i, name in enumerate(names):
        row = all_states_zero()
        for state, size in zip(STATE_ORDER, sizes[i * width : (i + 1) * width], strict=True):
            row[state] = int(size)
        out[name] = row
    return out


async def list_jobs(
    broker: RedisBroker,
    *,
    queue: str | None,
    states: Iterable[JobState] | None,
    task: str | None,
    limit: int,
    cursor: str | None,
) -> JobPage:
    """Jobs matching the filters, newest enqueue first, ``limit`` (1-1000) per page.

    Each queue's ``all`` zset is walked from the newest sequence number down, filtering on the
    meta (state, task) before any record is decoded; the queues' matches merge by sequence
    number, which is global, so the order is the enqueue order across queues too. The cursor is
    the sequence number of the last job returned.
    """
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidJobError(f"limit must be an integer in 1-{MAX_PAGE}, got {limit!r}")
    wanted = None if states is None else frozenset(JobState(state) for state in states)
    before: int | None = None
    if cursor is not None:
        try:
            before = int(cursor)
        except ValueError:
            raise InvalidJobError(
                f"invalid cursor {cursor!r}; pass a next_cursor from a previous page"
            ) from None
    with broker.boundary("list_jobs"):
        names = [queue] if queue is not None else await broker.queue_names()
        found: list[tuple[int, Job]] = []
        for name in names:
            keys = broker.queue_keys(name)
            found += await _scan(broker, keys, wanted, task, before, limit + 1)
    found.sort(key=lambda item: item[0], reverse=True)
    page = found[:limit]
    next_cursor = str(page[-1][0]) if len(found) > limit else None
    return JobPage(jobs=[job for _, job in page], next_cursor=next_cursor)


async def _scan(
    broker: RedisBroker,
    keys: QueueKeys,
    wanted: frozenset[JobState] | None,
    task: str | None,
    before: int | None,
    need: int,
) -> list[tuple[int, Job]]:
    """Up to ``need`` matching jobs of one queue with sequence numbers below ``before``."""
    chunk = min(MAX_PAGE, max(100, need * 2))
    upper: str = "+inf" if before is None else f"({before}"
    out: list[tuple[int, Job]] = []
    redis = broker.redis
    while len(out) < need:
        members: list[Any] = await redis.zrevrangebyscore(
            keys.all, upper, "-inf", start=0, num=chunk, withscores=True
        )
        if not members:
            break
        ids = [member for member, _ in members]
        metas: list[Any] = await redis.hmget(keys.meta, ids)
        matches: list[tuple[int, Any, bytes]] = []
        for (job_id, score), raw in zip(members, metas, strict=True):
            if raw is None:
                continue  # removed since the zset was read
            meta = decode_meta(raw)
            if (wanted is None or meta.state in wanted) and (task is None or meta.task == task):
                matches.append((int(score), job_id, raw))
        matches = matches[: need - len(out)]
        if matches:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hmget(keys.jobs, [job_id for _, job_id, _ in matches])
                pipe.hmget(keys.results, [job_id for _, job_id, _ in matches])
                records, results = await pipe.execute()
            out += _assemble(broker, matches, records, results)
        if len(members) < chunk:
            break
        upper = f"({int(members[-1][1])}"
    return out


def _assemble(
    broker: RedisBroker,
    matches: list[tuple[int, Any, bytes]],
    records: list[Any],
    results: list[Any],
) -> list[tuple[int, Job]]:
    out: list[tuple[int, Job]] = []
    for (seq, _, meta), record, result in zip(matches, records, results, strict=True):
        if record is not None:
            out.append((seq, build_job(broker.codec, record, meta, result)))
    return out
