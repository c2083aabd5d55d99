"""The Redis key schema of the conveyor broker, in one place.

Every key of a queue carries the hash tag ``{PREFIX:QUEUE}``, so a queue lives in one Redis
Cluster slot and a Lua script may touch all of it. Job records live in per-queue hashes
(field = job id), so a script that picks jobs itself (``reserve``, ``requeue_expired``) still only
touches keys it declared. Per queue (``PREFIX`` defaults to ``conveyor``):

==========================  ==========  ============================================================
key                         type        content
==========================  ==========  ============================================================
``{P:Q}:jobs``              hash        id -> the job as enqueued, encoded by the broker's codec;
                                        never changed by a script (args, options, ...)
``{P:Q}:meta``              hash        id -> the job's mutable fields as a small JSON object
                                        (state, attempts, lease, timestamps, error, ...; see
                                        :class:`~conveyor.brokers.redis.records.JobMeta`); scripts
                                        decode and re-encode it with cjson
``{P:Q}:results``           hash        id -> the encoded result of a completed job
``{P:Q}:all``               zset        id by sequence number: enqueue order, for listing, and
                                        the FIFO part of the ready score (ZSCORE)
``{P:Q}:pending``           zset        id by sequence number
``{P:Q}:queued``            zset        id by ``priority rank * 2**40 + sequence`` (the ready queue:
                                        ZPOPMIN gives priority, then FIFO by enqueue order)
``{P:Q}:scheduled``         zset        id by ``run_at_ms``
``{P:Q}:running``           zset        id by lease deadline (epoch ms)
``{P:Q}:completed``         zset        id by ``finished_ms`` (likewise ``failed``, ``stopped``)
``{P:Q}:dedup``             hash        dedup key -> id of the live job that holds it
``{P:Q}:events``            stream      job events, ids ``<server µs>-<n>`` (one order across
                                        queues), trimmed to ~``event_retention`` once per call
``{P:Q}:notify``            list        wake-up tokens for ``wait_for_jobs`` (BLPOP), capped
``{P:Q}:logmeta``           hash        id -> number of log lines dropped by the cap
``{P:Q}:log:ID``            list        a job's kept log lines (LTRIM to ``max_log_lines``)
==========================  ==========  ============================================================

Sequence numbers come from one counter for all queues, so listing several queues merges by
enqueue order. The global keys share the hash tag ``{P}`` (one slot, so ``index_jobs.lua`` can
update them together):

==========================  ==========  ============================================================
``{P}:index``               hash        job id -> queue name; jobs are addressed by id alone
                                        (get/cancel/delete/start). Written before the job, deleted
                                        after it: a crash leaves at most a dangling entry, which
                                        reads as "not found".
``{P}:queues``              set         names of the queues that have (or had) jobs
``{P}:seq``                 string      the sequence counter (INCRBY per enqueue batch)
==========================  ==========  ============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from conveyor.job import JobState

DEFAULT_PREFIX: Final = "conveyor"

#: The states whose zset lies at KEYS[5..11] of every per-queue script (``includes/queue.lua``).
STATE_ORDER: Final = (
    JobState.PENDING,
    JobState.QUEUED,
    JobState.SCHEDULED,
    JobState.RUNNING,
    JobState.COMPLETED,
    JobState.FAILED,
    JobState.STOPPED,
)


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue; ``script_keys`` is the KEYS vector every per-queue script takes."""

    prefix: str
    queue: str
    tag: str = field(init=False)
    jobs: str = field(init=False)
    meta: str = field(init=False)
    results: str = field(init=False)
    all: str = field(init=False)
    dedup: str = field(init=False)
    events: str = field(init=False)
    notify: str = field(init=False)
    logmeta: str = field(init=False)
    states: dict[JobState, str] = field(init=False)
    script_keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        tag = f"{{{self.prefix}:{self.queue}}}"
        set_ = object.__setattr__  # a frozen dataclass computes its fields once, here
        set_(self, "tag", tag)
        for name in ("jobs", "meta", "results", "all", "dedup", "events", "notify", "logmeta"):
            set_(self, name, f"{tag}:{name}")
        states = {state: f"{tag}:{state.value}" for state in STATE_ORDER}
        set_(self, "states", states)
        # The order is the contract with lua/includes/queue.lua: KEYS[1..15].
        set_(
            self,
            "script_keys",
            (
                self.jobs,
                self.meta,
                self.results,
                self.all,
                *(states[state] for state in STATE_ORDER),
                self.dedup,
                self.events,
                self.notify,
                self.logmeta,
            ),
        )

    def log(self, job_id: str) -> str:
        """The list holding a job's kept log lines (KEYS[16..] of scripts that need them)."""
        return f"{self.tag}:log:{job_id}"

    def all_keys(self) -> list[str]:
        """Every fixed key of the queue (per-job log lists aside)."""
        return list(self.script_keys)


@dataclass(frozen=True, slots=True)
class GlobalKeys:
    """The keys shared by all queues (one slot, hash tag ``{PREFIX}``)."""

    prefix: str
    index: str = field(init=False)
    queues: str = field(init=False)
    seq: str = field(init=False)

    def __post_init__(self) -> None:
        tag = f"{{{self.prefix}}}"
        object.__setattr__(self, "index", f"{tag}:index")
        object.__setattr__(self, "queues", f"{tag}:queues")
        object.__setattr__(self, "seq", f"{tag}:seq")

    @property
    def script_keys(self) -> tuple[str, str, str]:
        """KEYS of ``index_jobs.lua``: index, queues, seq."""
        return (self.index, self.queues, self.seq)


def hash_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key`` (CRC16/XMODEM of the hash tag, mod 16384)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384
