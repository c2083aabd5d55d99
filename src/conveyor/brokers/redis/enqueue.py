"""Enqueue on Redis: index the ids globally, then store each queue's jobs with one script call.

On Redis Cluster, two steps, because the global index (job id -> queue) and a queue's keys live
in different slots. ``index_jobs.lua`` runs first (a crash in between leaves index entries that
point at no job, which read as "not found"); ``enqueue.lua`` then stores a queue's jobs all or
nothing. Index entries this call created for jobs that were not stored (deduplicated, or a
refused batch) are removed afterwards.

On a single server (``multi_queue_commands``), a chunk of one queue's jobs (the usual batch)
takes one step: ``index_and_enqueue.lua`` does both in one call, all or nothing, so a producer
pays one round trip per enqueue, not two (measured: the index step was ~0.25 ms of a ~0.75 ms
enqueue). A job id indexed in another queue sends the chunk down the two-step path, which tells
a stale index entry from a live one; so do chunks spanning queues.

Batches are cut into chunks of :data:`ENQUEUE_CHUNK` jobs so no script call blocks Redis for
long; each chunk is atomic per queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

from conveyor.brokers.redis.records import MAX_BATCH, RANK_SPAN, as_str, new_meta, pack, text
from conveyor.errors import InvalidJobError
from conveyor.job import Job, JobState

if TYPE_CHECKING:
    from conveyor.brokers.redis.broker import RedisBroker

#: Jobs per enqueue script call.
ENQUEUE_CHUNK: Final = MAX_BATCH
#: Event-loop turns redis-py needs to put a command on the socket (it sends from a helper task;
#: measured: 2). Too few only loses the overlap, never correctness.
_SEND_STEPS: Final = 3
_IN_USE: Final = (
    "is already in use; give each job a new id (conveyor.job.new_job_id()) "
    "or use dedup_key for idempotent enqueue"
)


async def enqueue_jobs(broker: RedisBroker, jobs: list[Job]) -> list[str]:
    """Store validated jobs; each job's id, or the id of the live job that deduplicated it."""
    _refuse_repeated_ids(jobs)
    out: list[str] = []
    with broker.boundary("enqueue"):
        for start in range(0, len(jobs), ENQUEUE_CHUNK):
            out += await _enqueue_chunk(broker, jobs[start : start + ENQUEUE_CHUNK])
    return out


def _refuse_repeated_ids(jobs: list[Job]) -> None:
    """Refuse a batch that repeats an id, before anything is written.

    A repeat that carries a dedup key may collapse into an earlier job instead, which only the
    script can tell; it is left to the script.
    """
    seen: set[str] = set()
    for job in jobs:
        if job.id in seen and job.dedup_key is None:
            raise InvalidJobError(f"job id {job.id!r} {_IN_USE}")
        seen.add(job.id)


async def _index(broker: RedisBroker, jobs: list[Job]) -> tuple[int, set[str]]:
    """Run ``index_jobs``: the batch's first sequence number, and the ids indexed before."""
    args = [pack([job.id for job in jobs]), pack([job.queue for job in jobs])]
    for _ in range(3):
        reply = await broker.run_script("index_jobs", broker.global_keys.script_keys, args)
        if reply[0] >= 0:
            return int(reply[1]), {text(raw) for raw in reply[2:]}
        job_id, other = text(reply[1]), text(reply[2])
        if not other or await broker.redis.hexists(broker.queue_keys(other).meta, job_id):
            raise InvalidJobError(f"job id {job_id!r} {_IN_USE}")
        # A dangling entry (a crash between the two steps): the id is free; drop it and retry.
        await broker.redis.hdel(broker.global_keys.index, job_id)
    raise InvalidJobError(f"job ids of this batch keep colliding; {_IN_USE}")


async def _enqueue_chunk(broker: RedisBroker, jobs: list[Job]) -> list[str]:
    by_queue: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        by_queue.setdefault(job.queue, []).append(i)
    if broker.multi_queue_commands and len(by_queue) == 1:
        # One queue (the usual batch): one call, all or nothing. Several queues keep the two
        # steps, whose index step checks every queue's ids before any queue is written.
        [queue] = by_queue
        stored = await _enqueue_one_step(broker, queue, jobs)
        if stored is not None:
            return stored
        # An id is indexed in another queue: the two steps tell a stale entry from a live one.
    return await _enqueue_two_steps(broker, jobs, by_queue)


async def _enqueue_one_step(broker: RedisBroker, queue: str, jobs: list[Job]) -> list[str] | None:
    """``index_and_enqueue`` for one queue's jobs; None if an id is indexed in another queue."""
    keys = broker.queue_keys(queue)
    bases: list[int] = []
    for job in jobs:
        if job.state is JobState.QUEUED:
            bases.append(job.priority.rank * RANK_SPAN)
        elif job.state is JobState.SCHEDULED:
            bases.append(job.run_at_ms)
        else:
            bases.append(0)
    args = [
        broker.clock.now_ms(),
        broker.event_retention,
        queue,
        pack(bases),
        *_columns(broker, jobs, list(range(len(jobs)))),
    ]
    reply = await broker.run_script(
        "index_and_enqueue", (*keys.script_keys, *broker.global_keys.script_keys), args
    )
    if reply[0] < 0:
        if len(reply) > 2:
            return None
        raise InvalidJobError(f"job id {text(reply[1])!r} {_IN_USE}")
    out = [job.id for job in jobs]
    # The reply lists only the deduplicated jobs: (1-based position, live id) pairs.
    for k in range(1, len(reply), 2):
        out[reply[k] - 1] = text(reply[k + 1])
    return out


async def _enqueue_two_steps(
    broker: RedisBroker, jobs: list[Job], by_queue: dict[str, list[int]]
) -> list[str]:
    first_seq, existing, columns = await _index_while_encoding(broker, jobs, by_queue)
    created = [job.id for job in jobs if job.id not in existing]
    out = [""] * len(jobs)
    try:
        for queue, positions in by_queue.items():
            args = [
                broker.clock.now_ms(),
                broker.event_retention,
                *_seq_columns(jobs, positions, first_seq),
                *columns[queue],
            ]
            reply = await broker.run_script("enqueue", broker.queue_keys(queue).script_keys, args)
            if reply[0] < 0:
                raise InvalidJobError(f"job id {text(reply[1])!r} {_IN_USE}")
            for i in positions:
                out[i] = jobs[i].id
            # The reply lists only the deduplicated jobs: (1-based position, live id) pairs.
            for k in range(1, len(reply), 2):
                out[positions[reply[k] - 1]] = text(reply[k + 1])
    except BaseException:
        # Nothing of the failed queue was written: its new index entries point at no job. If
        # Redis is gone this cleanup fails too, and the dangling entries read as "not found".
        stored = {job_id for job_id in out if job_id}
        orphans = [job_id for job_id in created if job_id not in stored]
        if orphans:
            with contextlib.suppress(Exception):
                await broker.redis.hdel(broker.global_keys.index, *orphans)
        raise
    # Deduplicated jobs were indexed but not stored: drop the entries this call created.
    stored = set(out)
    orphans = [job_id for job_id in created if job_id not in stored]
    if orphans:
        await broker.redis.hdel(broker.global_keys.index, *orphans)
    return out


async def _index_while_encoding(
    broker: RedisBroker, jobs: list[Job], by_queue: dict[str, list[int]]
) -> tuple[int, set[str], dict[str, list[bytes]]]:
    """Run the index step and, while Redis works on it, encode each queue's job columns.

    Only the sequence numbers depend on the index step's reply, so the rest of the arguments
    (most of the Python work of an enqueue) overlaps with the round trip instead of following it.
    """
    index = asyncio.ensure_future(_index(broker, jobs))
    try:
        for _ in range(_SEND_STEPS):
            await asyncio.sleep(0)  # let the index command reach the socket first
        columns = {
            queue: _columns(broker, jobs, positions) for queue, positions in by_queue.items()
        }
        first_seq, existing = await index
    finally:
        if not index.done():
            index.cancel()
            with contextlib.suppress(BaseException):
                await index
    return first_seq, existing, columns


def _seq_columns(jobs: list[Job], positions: list[int], first_seq: int) -> list[bytes]:
    """ARGV[3..4] of ``enqueue.lua``: scores and sequence numbers (known after the index step)."""
    seqs = [first_seq + i for i in positions]
    scores: list[int] = []
    for i, seq in zip(positions, seqs, strict=True):
        job = jobs[i]
        if job.state is JobState.QUEUED:
            scores.append(job.priority.rank * RANK_SPAN + seq)
        elif job.state is JobState.SCHEDULED:
            scores.append(job.run_at_ms)
        else:
            scores.append(seq)
    return [pack(scores), pack(seqs)]


def _columns(broker: RedisBroker, jobs: list[Job], positions: list[int]) -> list[bytes]:
    """ARGV[5..11] of ``enqueue.lua``: the msgpack columns that need no sequence number."""
    encode_job = broker.codec.encode_job
    chosen = [jobs[i] for i in positions]
    return [
        pack([job.id for job in chosen]),
        pack([job.state.value for job in chosen]),
        pack([job.dedup_key or "" for job in chosen]),
        pack([job.task for job in chosen]),
        pack([as_str(encode_job(job)) for job in chosen]),
        pack([as_str(new_meta(job)) for job in chosen]),
    ]
