"""How a job is stored in Redis: the immutable encoded record plus a small mutable JSON "meta".

The record (args, kwargs, options) is encoded once by the broker's codec at enqueue and never
decoded by Lua: cjson would mangle payloads (big integers, ``[]`` vs ``{}``, float precision).
The fields that transitions change live in :class:`JobMeta`, a flat JSON object of strings and
integers that the scripts decode and re-encode with cjson. Reading a job overlays the meta on the
decoded record. Measured on the reserve+ack path this costs ~2 µs per job in Python and keeps each
script's work to one small hash field.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import msgspec

from conveyor.codec import Codec
from conveyor.errors import PayloadError
from conveyor.job import Job, JobState

logger = logging.getLogger(__name__)

#: Sequence numbers stay below this, so ``rank * RANK_SPAN + seq`` orders by priority then FIFO.
RANK_SPAN: Final = 1 << 40


class JobMeta(msgspec.Struct, omit_defaults=True):
    """The mutable part of a stored job (``{P:Q}:meta`` field), shared with the Lua scripts.

    Fields without defaults are always present, so scripts can do arithmetic on them; optional
    fields are omitted when unset (a Lua ``nil``), never ``null`` (cjson's ``null`` is truthy).
    ``task``, ``rank`` and ``max_*`` are copies of immutable fields that the scripts need without
    decoding the record; ``dedup_key`` too, except that a redrive drops it when another live job
    holds the key (the meta's value wins over the record's). The sequence number is not here: it
    is the job's score in the queue's ``all`` zset (so metas can be encoded before it is
    allocated).
    """

    state: JobState
    task: str
    rank: int
    attempts: int
    max_attempts: int
    lost_leases: int
    max_lost_leases: int
    enqueued_ms: int
    run_at_ms: int
    progress: int
    started_ms: int | None = None
    finished_ms: int | None = None
    description: str = ""
    error: str | None = None
    traceback: str | None = None
    failure_reason: str | None = None
    lease_token: str | None = None
    lease_expires_ms: int | None = None
    worker_id: str | None = None
    dedup_key: str | None = None


#: Most items per batched script call: scripts unpack() per-item lists, which Lua caps near 8,000.
MAX_BATCH: Final = 1000

_META_ENCODER: Final = msgspec.json.Encoder()
#: Batches travel to the scripts as one msgpack ARGV (cmsgpack.unpack in Lua): far cheaper to
#: send than one argument per field.
pack: Final = msgspec.msgpack.Encoder().encode
_META_DECODER: Final = msgspec.json.Decoder(JobMeta)


def new_meta(job: Job) -> bytes:
    """The meta JSON of a job about to be enqueued (``job`` is already prepared by the broker)."""
    return _META_ENCODER.encode(
        JobMeta(
            state=job.state,
            task=job.task,
            rank=job.priority.rank,
            attempts=0,
            max_attempts=job.max_attempts,
            lost_leases=0,
            max_lost_leases=job.max_lost_leases,
            enqueued_ms=job.enqueued_ms,
            run_at_ms=job.run_at_ms,
            progress=job.progress,
            description=job.description,
            dedup_key=job.dedup_key,
        )
    )


def decode_meta(raw: bytes) -> JobMeta:
    """Decode a meta JSON object written by Python or by a script."""
    return _META_DECODER.decode(raw)


def apply_meta(job: Job, meta: JobMeta) -> Job:
    """Overlay the mutable fields on a decoded record (in place) and return it."""
    job.state = meta.state
    job.attempts = meta.attempts
    job.lost_leases = meta.lost_leases
    job.enqueued_ms = meta.enqueued_ms
    job.run_at_ms = meta.run_at_ms
    job.started_ms = meta.started_ms
    job.finished_ms = meta.finished_ms
    job.progress = meta.progress
    job.description = meta.description
    job.error = meta.error
    job.traceback = meta.traceback
    job.failure_reason = meta.failure_reason
    job.lease_token = meta.lease_token
    job.lease_expires_ms = meta.lease_expires_ms
    job.worker_id = meta.worker_id
    job.dedup_key = meta.dedup_key  # redrive may drop it (another live job holds the key)
    return job


def build_job(codec: Codec, record: bytes, meta: bytes, result: bytes | None = None) -> Job:
    """The full job from its stored parts (record, meta JSON and, if any, encoded result)."""
    job = codec.decode_job_lenient(record)
    if job is None:
        raise PayloadError("the stored job record cannot be decoded (not even its id)")
    job = apply_meta(job, _META_DECODER.decode(meta))
    if result:
        job.result = codec.decode(result)
    return job


def build_jobs(codec: Codec, flat: list[Any]) -> list[Job]:
    """Jobs from a script's flat ``[record, meta, record, meta, ...]`` reply."""
    decode_job = codec.decode_job_lenient
    decode = _META_DECODER.decode
    jobs = []
    for i in range(0, len(flat), 2):
        job = decode_job(flat[i])
        if job is None:
            # Not even its id is readable: it cannot be dead-lettered from here. Its lease
            # expires and the lost-lease limit dead-letters it; the other jobs still run.
            logger.error("a reserved job record is undecodable; left to its lease expiry")
            continue
        jobs.append(apply_meta(job, decode(flat[i + 1])))
    return jobs


def as_str(data: bytes | str) -> msgspec.Raw | str:
    """Bytes to pack as a msgpack *str*: Redis's cmsgpack cannot read the bin type.

    Lua strings are byte strings, so the bytes need not be UTF-8 (msgpack-coded records too).
    """
    if isinstance(data, str):
        return data
    n = len(data)
    if n < 32:
        head = bytes((0xA0 | n,))
    elif n < 0x100:
        head = b"\xd9" + n.to_bytes(1, "big")
    elif n < 0x10000:
        head = b"\xda" + n.to_bytes(2, "big")
    else:
        head = b"\xdb" + n.to_bytes(4, "big")
    return msgspec.Raw(head + data)


def text(value: Any) -> str:
    """A reply item as text (replies are bytes; typed loosely by redis-py)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def opt_arg(value: str | None) -> str:
    """An optional string as a script argument: '' for None, else '=' + value."""
    return "" if value is None else "=" + value
