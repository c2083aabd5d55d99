"""Bulk control-plane transitions of the Redis broker: redrive, purge and cleanup.

Each reads its candidate ids from the queue's state zsets first, then runs its script over them
in chunks of :data:`REMOVE_CHUNK`: the script re-checks every job, so a job that moved on in
between is skipped, and purge/cleanup can declare each job's log list in KEYS (a script may only
touch keys it declared). Chunking keeps every script call short, so Redis stays responsive while
a large dead-letter set or an old backlog is processed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from conveyor.brokers.base import PURGEABLE_STATES
from conveyor.brokers.redis.keys import QueueKeys
from conveyor.brokers.redis.records import text
from conveyor.errors import InvalidJobError
from conveyor.job import FINISHED_STATES, JobState

if TYPE_CHECKING:
    from conveyor.brokers.redis.broker import RedisBroker

#: Ids per redrive/purge/cleanup script call.
REMOVE_CHUNK: Final = 500


def _states(states: Iterable[JobState | str]) -> frozenset[JobState]:
    try:
        return frozenset(JobState(state) for state in states)
    except ValueError as exc:
        raise InvalidJobError(f"{exc}; use states from: {', '.join(JobState)}") from None


async def redrive(broker: RedisBroker, queue: str, job_ids: Sequence[str] | None) -> int:
    """Dead letters (and, by id, stopped jobs) of ``queue`` back to ``queued``; how many."""
    keys = broker.queue_keys(queue)
    with broker.boundary("redrive"):
        if job_ids is None:
            ids = [
                text(raw) for raw in await broker.redis.zrange(keys.states[JobState.FAILED], 0, -1)
            ]
            flag = "0"
        else:
            ids = list(dict.fromkeys(job_ids))  # a repeated id is re-driven once
            flag = "1"
        if ids:
            # Enqueue order (the seq is the score in `all`; unknown ids last): of two re-driven
            # jobs with one dedup key, the older keeps it.
            seqs = await broker.redis.zmscore(keys.all, ids)
            order = {
                job_id: s if s is not None else float("inf")
                for job_id, s in zip(ids, seqs, strict=True)
            }
            ids.sort(key=order.__getitem__)
        count = 0
        for start in range(0, len(ids), REMOVE_CHUNK):
            chunk = ids[start : start + REMOVE_CHUNK]
            args = [broker.clock.now_ms(), broker.event_retention, flag, *chunk]
            count += int(await broker.run_script("redrive", keys.script_keys, args))
    return count


async def purge(broker: RedisBroker, queue: str, states: Iterable[JobState] | None) -> int:
    """Delete the jobs of ``queue`` in ``states`` (never running ones); how many."""
    chosen = PURGEABLE_STATES if states is None else _states(states)
    if JobState.RUNNING in chosen:
        raise InvalidJobError(
            "purge never removes running jobs; cancel them first, then purge 'stopped'"
        )
    if not chosen:
        return 0
    keys = broker.queue_keys(queue)
    with broker.boundary("purge"):
        async with broker.redis.pipeline(transaction=True) as pipe:
            for state in chosen:
                pipe.zrange(keys.states[state], 0, -1)
            found = await pipe.execute()
        ids = [text(raw) for members in found for raw in members]
        state_arg = ",".join(sorted(state.value for state in chosen))
        return await _remove(broker, "purge", keys, state_arg, ids)


async def cleanup(broker: RedisBroker, retention_s: float, *, queue: str | None) -> int:
    """Delete finished jobs whose ``finished_ms`` is over ``retention_s`` ago; how many."""
    cutoff = broker.clock.now_ms() - round(retention_s * 1000)
    removed = 0
    with broker.boundary("cleanup"):
        names = [queue] if queue is not None else await broker.queue_names()
        for name in names:
            keys = broker.queue_keys(name)
            async with broker.redis.pipeline(transaction=True) as pipe:
                for state in FINISHED_STATES:
                    pipe.zrangebyscore(keys.states[state], "-inf", f"({cutoff}")
                found = await pipe.execute()
            ids = [text(raw) for members in found for raw in members]
            removed += await _remove(broker, "cleanup", keys, cutoff, ids)
    return removed


async def _remove(
    broker: RedisBroker, action: str, keys: QueueKeys, arg: Any, ids: list[str]
) -> int:
    """Run purge/cleanup over ``ids`` in chunks; drop the removed ids from the index after."""
    removed = 0
    for start in range(0, len(ids), REMOVE_CHUNK):
        chunk = ids[start : start + REMOVE_CHUNK]
        script_keys = (*keys.script_keys, *(keys.log(job_id) for job_id in chunk))
        args = [broker.clock.now_ms(), broker.event_retention, arg, *chunk]
        gone = await broker.run_script(action, script_keys, args)
        if gone:
            await broker.redis.hdel(broker.global_keys.index, *gone)
        removed += len(gone)
    return removed
