"""The in-memory broker: the whole broker contract on asyncio primitives, for tests and one process.

Every transition runs without an ``await`` in between, so it is one uninterrupted block on the
event loop and therefore atomic. Records are mutated in place inside the broker and only copies
leave it; a job's payload and result are kept encoded and decoded on every read, so neither a
producer nor a task that mutates its arguments can change what is stored (the same guarantee the
SQLite and Redis brokers give by construction).
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from itertools import islice
from typing import Any, ClassVar, Final

import msgspec

from conveyor.brokers.base import (
    DEFAULT_EVENT_RETENTION,
    DEFAULT_MAX_LOG_LINES,
    PURGEABLE_STATES,
    Broker,
    BrokerCapabilities,
    EventKind,
    ExpiredReport,
    JobEvent,
    JobPage,
    LogPage,
    all_states_zero,
    parse_int,
    parse_states,
)
from conveyor.clock import Clock
from conveyor.codec import Codec
from conveyor.errors import ErrorCode, InvalidJobError, InvalidTransition, error_for_code
from conveyor.job import FINISHED_STATES, FailureReason, Job, JobState, Lease, Priority, Transition

_S = JobState
# Ready-heap keys pack (priority rank, enqueue sequence) into one int: int comparisons are cheaper
# than tuple comparisons on the reserve hot path, and 48 bits of sequence never run out in-process.
_SEQ_BITS: Final = 48
_SEQ_MASK: Final = (1 << _SEQ_BITS) - 1
_RANK_KEY: Final = {p: p.rank << _SEQ_BITS for p in Priority}
_MAX_DESCRIPTION: Final = 1024
_NO_ARGS: Final[list[Any]] = []  # placeholders: the real payload lives encoded in _Entry.payload
_NO_KWARGS: Final[dict[str, Any]] = {}

# Events are kept as plain tuples in JobEvent field order (id first, as an int) and become JobEvent
# structs only when a subscriber reads them: most are never read, and building structs and string
# ids for all of them would dominate the cost of enqueue and reserve.
_EVENT_FIELDS: Final = (
    "id", "kind", "job_id", "queue", "ts_ms", "state", "transition", "task", "attempts",
    "progress", "description", "line", "error",
)  # fmt: skip
_EventRecord = tuple[Any, ...]


class _Entry(msgspec.Struct, gc=False):
    """One stored job: the broker-owned record plus what the memory broker keeps beside it.

    ``gc=False`` keeps a big store from slowing every garbage collection; it is safe because an
    entry never takes part in a reference cycle (nothing it holds points back at it).
    """

    job: Job
    seq: int  # enqueue order: FIFO within a priority, and list_jobs order
    payload: bytes  # encoded [args, kwargs]
    result: bytes | None = None  # encoded result, None when the result is None
    logs: deque[str] | None = None  # created on the first log line
    dropped: int = 0


class MemoryBroker(Broker):
    """A broker that keeps everything in this process (not durable, not shared).

    Args:
        clock: source of epoch-ms time (default: the system clock).
        codec: payload encoder and size cap (default: JSON, 1 MiB).
        max_log_lines: log lines kept per job; older ones are dropped and counted.
        event_retention: how many recent events are kept for resuming subscribers.
    """

    scheme: ClassVar[str] = "memory"
    capabilities: ClassVar[BrokerCapabilities] = BrokerCapabilities(durable=False, shared=False)

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        codec: Codec | None = None,
        max_log_lines: int = DEFAULT_MAX_LOG_LINES,
        event_retention: int = DEFAULT_EVENT_RETENTION,
    ) -> None:
        super().__init__(
            clock=clock, codec=codec, max_log_lines=max_log_lines, event_retention=event_retention
        )
        self._entries: dict[str, _Entry] = {}  # insertion order == enqueue order
        self._seq = 0
        # Heaps use lazy deletion: an item is acted on only if it still matches its entry.
        self._ready: dict[str, list[tuple[int, str]]] = {}  # queue -> [(rank|seq, id)]
        self._scheduled: dict[str, list[tuple[int, int, str]]] = {}  # queue -> [(run_at, seq, id)]
        self._running: dict[str, dict[str, _Entry]] = {}
        self._counts: dict[str, dict[JobState, int]] = {}  # also the set of known queues
        self._dedup: dict[tuple[str, str], str] = {}  # (queue, key) -> live job id
        self._events: deque[_EventRecord] = deque(maxlen=event_retention)
        self._event_seq = 0  # id of the newest event ever published
        self._event_waiter: asyncio.Future[None] | None = None  # shared by all idle subscribers
        self._ready_waiters: dict[str, asyncio.Future[None]] = {}  # queue -> shared wake-up
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Nothing to open; marks the broker usable again after :meth:`close`."""
        self._closed = False

    async def close(self) -> None:
        """Wake every subscriber (their iterators end) and every ``wait_for_jobs`` caller."""
        self._closed = True
        self._wake_subscribers()
        for queue in list(self._ready_waiters):
            self._notify_ready(queue)

    async def ping(self) -> None:
        """Always answers: the store is this process."""

    # -- producers -------------------------------------------------------------------------------

    async def _enqueue(self, jobs: list[Job]) -> list[str]:
        # First decide every job's fate without writing, so a refusal leaves nothing behind.
        out: list[str] = []
        fresh: list[Job] = []
        batch_keys: dict[tuple[str, str], str] = {}
        batch_ids: set[str] = set()
        for job in jobs:
            if job.dedup_key is not None:
                key = (job.queue, job.dedup_key)
                live = self._dedup.get(key) or batch_keys.get(key)
                if live is not None:
                    out.append(live)
                    continue
                batch_keys[key] = job.id
            if job.id in self._entries or job.id in batch_ids:
                raise InvalidJobError(
                    f"job id {job.id!r} is already in use; give each job a new id "
                    "(conveyor.job.new_job_id()) or use dedup_key for idempotent enqueue"
                )
            batch_ids.add(job.id)
            out.append(job.id)
            fresh.append(job)
        payloads = [self.codec.encode([job.args, job.kwargs]) for job in fresh]
        # The hot loop of bulk enqueue: plain locals, one wake-up per queue rather than per job.
        now = self.clock.now_ms()
        entries, counts_of, events = self._entries, self._counts, self._events
        touched: set[str] = set()
        for job, payload in zip(fresh, payloads, strict=True):
            self._seq += 1
            entry = entries[job.id] = _Entry(job, self._seq, payload)
            job.args, job.kwargs = _NO_ARGS, _NO_KWARGS
            counts = counts_of.get(job.queue)
            if counts is None:
                counts = counts_of[job.queue] = all_states_zero()
            counts[job.state] += 1
            if job.dedup_key is not None:
                self._dedup[(job.queue, job.dedup_key)] = job.id
            if job.state is not _S.PENDING:
                self._place(entry)
                touched.add(job.queue)
            self._event_seq += 1
            events.append(_state_record(self._event_seq, job, Transition.ENQUEUE, now))
        for queue in touched:
            self._notify_ready(queue)
        self._wake_subscribers()
        return out

    async def start(self, job_id: str) -> Job:
        """``pending`` -> ``queued`` (or ``scheduled`` if its run_at is in the future)."""
        entry = self._find(job_id, Transition.START)
        job = entry.job
        if job.state is not _S.PENDING:
            raise InvalidTransition(
                f"start({job_id}): the job is {job.state}, not pending; "
                "only held (pending) jobs can be started"
            )
        now = self.clock.now_ms()
        self._move(entry, _S.SCHEDULED if job.run_at_ms > now else _S.QUEUED, Transition.START, now)
        return self._export(entry)

    # -- consumers -------------------------------------------------------------------------------

    async def reserve(
        self, queue: str, n: int, *, lease_s: float, worker_id: str = ""
    ) -> list[Job]:
        """Take up to ``n`` due jobs of ``queue`` (promoting its due scheduled jobs first)."""
        return self._reserve(queue, n, lease_s, worker_id)

    def _reserve(self, queue: str, n: int, lease_s: float, worker_id: str) -> list[Job]:
        now = self.clock.now_ms()
        self._promote_due(queue, now, max(n, 1000))
        heap = self._ready.get(queue)
        out: list[Job] = []
        expires = now + round(lease_s * 1000)
        # One random prefix per call, made unique per job by its enqueue sequence (as the other
        # brokers do): one urandom call per batch rather than per job.
        prefix = secrets.token_hex(8) if heap else ""
        while heap and len(out) < n:
            entry = self._ready_entry(heapq.heappop(heap))
            if entry is None:
                continue  # stale heap item: the job was cancelled, deleted or re-enqueued
            self._move(entry, _S.RUNNING, Transition.RESERVE, now)
            job = entry.job
            job.lease_token, job.lease_expires_ms = f"{prefix}.{entry.seq}", expires
            job.started_ms, job.worker_id = now, worker_id or None
            out.append(self._export(entry))
        return out

    async def wait_for_jobs(self, queues: Sequence[str], timeout_s: float) -> None:
        """Block until a job of ``queues`` may be reservable, or ``timeout_s`` passes.

        Wakes on a queued or newly scheduled job; the earliest scheduled job shortens the wait.
        """
        if self._closed or timeout_s <= 0:
            return
        now = self.clock.now_ms()
        timeout = timeout_s
        for queue in queues:
            counts = self._counts.get(queue)
            if counts is not None and counts[_S.QUEUED]:
                return
            due = self._earliest_scheduled(queue)
            if due is not None:
                if due <= now:
                    return
                # With a FakeClock this is fake time read as a real wait: still a valid bound.
                timeout = min(timeout, (due - now) / 1000)
        loop = asyncio.get_running_loop()
        waiters = []
        for queue in queues or ("",):  # "" is never a queue name: it waits for close() only
            fut = self._ready_waiters.get(queue)
            if fut is None:
                fut = self._ready_waiters[queue] = loop.create_future()
            waiters.append(fut)
        # asyncio.wait never cancels the shared futures, unlike wait_for on a bare future.
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)

    async def extend_lease(self, leases: Sequence[Lease], lease_s: float) -> list[bool]:
        """Push each held lease's deadline to now + lease_s; False for leases no longer held."""
        expires = self.clock.now_ms() + round(lease_s * 1000)
        out: list[bool] = []
        for lease in leases:
            entry = self._entries.get(lease.job_id)
            held = entry is not None and _holds(entry, lease)
            if entry is not None and held:
                entry.job.lease_expires_ms = expires
            out.append(held)
        return out

    async def ack(self, lease: Lease, result: Any = None) -> None:
        """``running`` -> ``completed`` with ``result``; charges the attempt."""
        entry = self._held(lease, Transition.ACK)
        self._complete(entry, self._encode_result(lease, result), self.clock.now_ms())

    async def ack_many(self, items: Sequence[tuple[Lease, Any]]) -> list[bool]:
        """Ack several jobs in one step; per item, False if its lease is stale.

        Results are encoded before any job changes, so an unencodable one raises and acks nothing.
        """
        return self._ack_many(items)

    def _ack_many(self, items: Sequence[tuple[Lease, Any]]) -> list[bool]:
        data = [self._encode_result(lease, result) for lease, result in items]
        now = self.clock.now_ms()
        out: list[bool] = []
        for (lease, _), encoded in zip(items, data, strict=True):
            entry = self._entries.get(lease.job_id)
            held = entry is not None and _holds(entry, lease)
            if entry is not None and held:
                self._complete(entry, encoded, now)
            out.append(held)
        return out

    async def ack_and_reserve(
        self,
        acks: Sequence[tuple[Lease, Any]],
        queue: str,
        n: int,
        *,
        lease_s: float,
        worker_id: str = "",
    ) -> tuple[list[bool], list[Job]]:
        """:meth:`ack_many` of ``acks`` (leases of ``queue``), then :meth:`reserve`: one block."""
        self._check_ack_queue(acks, queue)
        held = self._ack_many(acks) if acks else []
        return held, self._reserve(queue, n, lease_s, worker_id)

    async def retry(
        self,
        lease: Lease,
        *,
        run_at_ms: int,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``scheduled`` at ``run_at_ms`` (``queued`` if due); charges one."""
        entry = self._held(lease, Transition.RETRY)
        now = self.clock.now_ms()
        job = entry.job
        job.attempts += 1
        job.error, job.traceback, job.run_at_ms = error, traceback, run_at_ms
        self._move(entry, _S.SCHEDULED if run_at_ms > now else _S.QUEUED, Transition.RETRY, now)
        return self._export(entry)

    async def dead_letter(
        self,
        lease: Lease,
        *,
        reason: FailureReason,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``failed`` (dead letters) with reason, error, traceback; charges one."""
        entry = self._held(lease, Transition.DEAD_LETTER)
        job = entry.job
        job.attempts += 1
        job.error, job.traceback, job.failure_reason = error, traceback, str(reason)
        self._move(entry, _S.FAILED, Transition.DEAD_LETTER, self.clock.now_ms())
        return self._export(entry)

    async def release(self, lease: Lease) -> Job:
        """``running`` -> ``queued`` at once, charging nothing; the job keeps its FIFO place."""
        entry = self._held(lease, Transition.RELEASE)
        self._move(entry, _S.QUEUED, Transition.RELEASE, self.clock.now_ms())
        return self._export(entry)

    async def requeue_expired(self, queue: str, *, limit: int = 1000) -> ExpiredReport:
        """Recover running jobs of ``queue`` whose lease deadline has passed."""
        report = ExpiredReport(requeued=[], dead_lettered=[])
        now = self.clock.now_ms()
        # Scanning is fine: the running set is bounded by worker concurrency, not queue length.
        expired = [
            entry
            for entry in self._running.get(queue, {}).values()
            if entry.job.lease_expires_ms is not None and entry.job.lease_expires_ms < now
        ]
        for entry in expired[: max(limit, 0)]:
            job = entry.job
            job.attempts += 1
            job.lost_leases += 1
            if job.lost_leases >= job.max_lost_leases:
                job.failure_reason = FailureReason.POISON.value
            elif job.attempts >= job.max_attempts:
                job.failure_reason = FailureReason.EXHAUSTED.value
            else:
                self._move(entry, _S.QUEUED, Transition.REQUEUE_EXPIRED, now)
                report.requeued.append(job.id)
                continue
            job.error = f"the job's lease expired {job.lost_leases} time(s): its worker died"
            self._move(entry, _S.FAILED, Transition.REQUEUE_EXPIRED, now)
            report.dead_lettered.append(job.id)
        return report

    async def promote_scheduled(self, queue: str, *, limit: int = 1000) -> int:
        """``scheduled`` -> ``queued`` for jobs of ``queue`` whose ``run_at_ms`` has come; count."""
        return self._promote_due(queue, self.clock.now_ms(), limit)

    async def next_scheduled_ms(self, queue: str) -> int | None:
        """The earliest ``run_at_ms`` of the scheduled jobs of ``queue``, or None."""
        return self._earliest_scheduled(queue)

    # -- control plane ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Stop a live job (a running one loses its lease at once); returns the stopped job."""
        entry = self._find(job_id, Transition.CANCEL)
        if entry.job.state in FINISHED_STATES:
            raise InvalidTransition(
                f"cancel({job_id}): the job is already {entry.job.state}; only pending, queued, "
                "scheduled or running jobs can be cancelled"
            )
        self._move(entry, _S.STOPPED, Transition.CANCEL, self.clock.now_ms())
        return self._export(entry)

    async def delete(self, job_id: str) -> None:
        """Remove a job in any state, with its logs; a running job's lease goes with it."""
        self._remove(self._find(job_id, "delete"), "delete", self.clock.now_ms())

    async def redrive(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Dead letters (and, by id, stopped jobs) of ``queue`` back to ``queued``, reset.

        A job whose ``dedup_key`` another live job holds now is re-driven without it.
        """
        if job_ids is None:
            if not self._counts.get(queue, {}).get(_S.FAILED):
                return 0
            candidates = [e for e in self._entries.values() if e.job.state is _S.FAILED]
        else:  # dict.fromkeys: a repeated id is re-driven once
            found = (self._entries.get(job_id) for job_id in dict.fromkeys(job_ids))
            candidates = [e for e in found if e is not None and e.job.state in _REDRIVABLE]
        # Enqueue order: of two re-driven jobs with one dedup key, the older keeps it.
        targets = sorted((e for e in candidates if e.job.queue == queue), key=lambda e: e.seq)
        now = self.clock.now_ms()
        for entry in targets:
            job = entry.job
            job.attempts = job.lost_leases = 0
            job.error = job.traceback = job.failure_reason = None
            job.finished_ms = entry.result = None
            # Reclaim the key if it is free; if another live job took it meanwhile, run without
            # it (drop the claim): one key keeps at most one live job.
            key = job.dedup_key
            if key is not None and self._dedup.setdefault((queue, key), job.id) != job.id:
                job.dedup_key = None
            self._move(entry, _S.QUEUED, Transition.REDRIVE, now)
        return len(targets)

    async def purge(self, queue: str, states: Iterable[JobState] | None = None) -> int:
        """Delete the jobs of ``queue`` in ``states`` (default: pending, queued, scheduled)."""
        wanted = PURGEABLE_STATES if states is None else parse_states(states)
        if _S.RUNNING in wanted:
            raise InvalidJobError(
                "purge never removes running jobs; cancel them first, then purge 'stopped'"
            )
        entries = self._entries.values()
        victims = [e for e in entries if e.job.queue == queue and e.job.state in wanted]
        now = self.clock.now_ms()
        for entry in victims:
            self._remove(entry, "purge", now)
        if victims:  # drop the stale heap items at once so memory follows the live job count
            ready, scheduled = self._ready.get(queue, []), self._scheduled.get(queue, [])
            ready[:] = [item for item in ready if self._ready_entry(item) is not None]
            scheduled[:] = [item for item in scheduled if self._scheduled_entry(item) is not None]
            heapq.heapify(ready)
            heapq.heapify(scheduled)
        return len(victims)

    async def cleanup(self, retention_s: float, *, queue: str | None = None) -> int:
        """Delete finished jobs that finished more than ``retention_s`` ago."""
        now = self.clock.now_ms()
        cutoff = now - round(retention_s * 1000)
        victims = [
            e
            for e in self._entries.values()
            if e.job.state in FINISHED_STATES
            and (queue is None or e.job.queue == queue)
            and (e.job.finished_ms or 0) < cutoff
        ]
        for entry in victims:
            self._remove(entry, "cleanup", now)
        return len(victims)

    # -- progress and logs -----------------------------------------------------------------------

    async def set_progress(
        self, lease: Lease, progress: int | None = None, description: str | None = None
    ) -> None:
        """Record a running job's progress (clamped to 0-100) and/or description (truncated)."""
        job = self._held(lease, "set_progress").job
        if progress is None and description is None:
            return
        if progress is not None:
            job.progress = max(0, min(100, int(progress)))
        if description is not None:
            job.description = description[:_MAX_DESCRIPTION]
        self._event_seq += 1
        self._events.append(
            (self._event_seq, EventKind.PROGRESS, job.id, job.queue, self.clock.now_ms(),
             None, None, None, None, job.progress, job.description, None, None)
        )  # fmt: skip
        self._wake_subscribers()

    async def append_log(self, lease: Lease, lines: Sequence[str], *, dropped: int = 0) -> None:
        """Append log lines to a job (the token is not checked; the job must exist)."""
        entry = self._find(lease.job_id, "append_log")
        if isinstance(lines, str):  # a lone string would otherwise be logged a character per line
            lines = [lines]
        entry.dropped += max(0, dropped)
        if not lines:
            return
        if entry.logs is None:
            entry.logs = deque(maxlen=self.max_log_lines)
        entry.dropped += max(0, len(entry.logs) + len(lines) - self.max_log_lines)
        entry.logs.extend(lines)
        job, now = entry.job, self.clock.now_ms()
        for line in lines:
            self._event_seq += 1
            self._events.append(
                (self._event_seq, EventKind.LOG, job.id, job.queue, now,
                 None, None, None, None, None, None, line, None)
            )  # fmt: skip
        self._wake_subscribers()

    async def logs(self, job_id: str, *, offset: int = 0, limit: int | None = None) -> LogPage:
        """A job's kept log lines from ``offset`` (0 = oldest kept)."""
        entry = self._find(job_id, "logs")
        if offset < 0 or (limit is not None and limit < 0):
            raise InvalidJobError("logs offset and limit must be >= 0")
        kept: Sequence[str] = entry.logs if entry.logs is not None else ()
        lines = list(islice(kept, offset, None if limit is None else offset + limit))
        return LogPage(lines=lines, dropped=entry.dropped, total=len(kept))

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """A copy of the job with this id, or None."""
        entry = self._entries.get(job_id)
        return None if entry is None else self._export(entry)

    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        states: Iterable[JobState] | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs matching the filters, newest enqueue first; ``cursor`` is the last seen sequence."""
        if not 1 <= limit <= 1000:
            raise InvalidJobError(f"list_jobs limit must be 1-1000, got {limit!r}")
        wanted = None if states is None else parse_states(states)
        before = parse_int(cursor, "cursor", "memory") if cursor is not None else None
        jobs: list[Job] = []
        # A linear scan from the newest: fine for an in-process store, and the sequence cursor
        # (not an offset) means jobs added between pages never shift or repeat later pages.
        for entry in reversed(self._entries.values()):
            job = entry.job
            if (
                (before is not None and entry.seq >= before)
                or (queue is not None and job.queue != queue)
                or (wanted is not None and job.state not in wanted)
                or (task is not None and job.task != task)
            ):
                continue
            if len(jobs) == limit:  # one more match exists: there is a next page
                return JobPage(jobs=jobs, next_cursor=str(self._entries[jobs[-1].id].seq))
            jobs.append(self._export(entry))
        return JobPage(jobs=jobs, next_cursor=None)

    async def counts(self, queue: str | None = None) -> dict[str, dict[JobState, int]]:
        """Per queue, the number of jobs in each state; a named queue always gets its row."""
        if queue is not None:
            return {queue: dict(self._counts.get(queue) or all_states_zero())}
        return {name: dict(row) for name, row in sorted(self._counts.items())}

    async def queues(self) -> list[str]:
        """Names of the queues that have (or had) jobs, sorted."""
        return sorted(self._counts)

    # -- events ----------------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        queue: str | None = None,
        job_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[JobEvent]:
        """Stream job events; "new" means published after this call. Ends when the broker closes."""
        start = self._event_seq if after is None else parse_int(after, "event id", "memory")
        return self._stream(start, queue, job_id)

    async def _stream(
        self, cursor: int, queue: str | None, job_id: str | None
    ) -> AsyncIterator[JobEvent]:
        while not self._closed:
            if cursor < self._event_seq:
                batch = self._events_after(cursor)
                cursor = self._event_seq
                for record in batch:
                    if (queue is None or record[3] == queue) and (
                        job_id is None or record[2] == job_id
                    ):
                        yield _to_event(record)
                continue
            waiter = self._event_waiter
            if waiter is None:
                waiter = self._event_waiter = asyncio.get_running_loop().create_future()
            # shield: cancelling this consumer must not cancel the future other subscribers share.
            await asyncio.shield(waiter)

    def _events_after(self, cursor: int) -> list[_EventRecord]:
        events = self._events
        n = min(self._event_seq - cursor, len(events))
        if n * 2 > len(events):
            return list(islice(events, len(events) - n, None))
        # deque indexing is cheap near the ends: a caught-up subscriber reads a short tail.
        return [events[-k] for k in range(n, 0, -1)]

    def _wake_subscribers(self) -> None:
        waiter, self._event_waiter = self._event_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _notify_ready(self, queue: str) -> None:
        """Wake ``wait_for_jobs`` callers of ``queue``.

        New scheduled jobs wake them too: one may fall due sooner than a waiter planned for.
        """
        waiter = self._ready_waiters.pop(queue, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- internals -------------------------------------------------------------------------------

    def _find(self, job_id: str, action: str) -> _Entry:
        entry = self._entries.get(job_id)
        if entry is None:
            raise error_for_code(ErrorCode.JOB_NOT_FOUND, action=action, job_id=job_id)
        return entry

    def _held(self, lease: Lease, action: str) -> _Entry:
        """The entry ``lease`` still holds, else JobNotFound / LeaseLost (nothing changes)."""
        entry = self._find(lease.job_id, action)
        if not _holds(entry, lease):
            raise error_for_code(ErrorCode.LEASE_LOST, action=action, job_id=lease.job_id)
        return entry

    def _encode_result(self, lease: Lease, result: Any) -> bytes | None:
        if result is None:
            return None
        return self.codec.check_value(result, what=f"job {lease.job_id} result")

    def _export(self, entry: _Entry) -> Job:
        """A caller-owned copy: fresh args, kwargs and result decoded from the stored bytes."""
        args, kwargs = self.codec.decode(entry.payload)
        result = None if entry.result is None else self.codec.decode(entry.result)
        return msgspec.structs.replace(entry.job, args=args, kwargs=kwargs, result=result)

    def _complete(self, entry: _Entry, data: bytes | None, now: int) -> None:
        entry.result = data
        entry.job.attempts += 1
        self._move(entry, _S.COMPLETED, Transition.ACK, now)

    def _move(self, entry: _Entry, state: JobState, transition: str, now: int) -> None:
        """Move a stored job to ``state`` and publish it, keeping every index in step."""
        job = entry.job
        counts = self._counts[job.queue]
        counts[job.state] -= 1
        counts[state] += 1
        if job.state is _S.RUNNING:
            # Leaving running always ends the lease: a late ack with the old token is stale.
            self._running[job.queue].pop(job.id, None)
            job.lease_token = job.lease_expires_ms = None
        job.state = state
        if state is _S.RUNNING:
            self._running.setdefault(job.queue, {})[job.id] = entry
        elif state in FINISHED_STATES:
            job.finished_ms = now
            self._free_dedup(job)
        else:
            self._place(entry)
            self._notify_ready(job.queue)
        self._event_seq += 1
        self._events.append(_state_record(self._event_seq, job, transition, now))
        self._wake_subscribers()

    def _place(self, entry: _Entry) -> None:
        """Index a queued or scheduled job for reserve and promote."""
        job = entry.job
        if job.state is _S.QUEUED:
            ready = self._ready.get(job.queue)
            if ready is None:
                ready = self._ready[job.queue] = []
            heapq.heappush(ready, (_RANK_KEY[job.priority] | entry.seq, job.id))
        elif job.state is _S.SCHEDULED:
            heap = self._scheduled.get(job.queue)
            if heap is None:
                heap = self._scheduled[job.queue] = []
            heapq.heappush(heap, (job.run_at_ms, entry.seq, job.id))

    def _free_dedup(self, job: Job) -> None:
        if job.dedup_key is not None and self._dedup.get((job.queue, job.dedup_key)) == job.id:
            del self._dedup[(job.queue, job.dedup_key)]

    def _remove(self, entry: _Entry, action: str, now: int) -> None:
        """Forget a job (delete, purge, cleanup) and publish its ``deleted`` event."""
        job = entry.job
        del self._entries[job.id]
        self._counts[job.queue][job.state] -= 1
        if job.state is _S.RUNNING:
            self._running[job.queue].pop(job.id, None)
        self._free_dedup(job)
        self._event_seq += 1
        self._events.append(
            (self._event_seq, EventKind.DELETED, job.id, job.queue, now,
             None, action, job.task, None, None, None, None, None)
        )  # fmt: skip
        self._wake_subscribers()

    def _ready_entry(self, item: tuple[int, str]) -> _Entry | None:
        """The entry a ready-heap item stands for, or None if the item is stale."""
        entry = self._entries.get(item[1])
        if entry is None or entry.seq != item[0] & _SEQ_MASK or entry.job.state is not _S.QUEUED:
            return None
        return entry

    def _scheduled_entry(self, item: tuple[int, int, str]) -> _Entry | None:
        """The entry a scheduled-heap item stands for, or None if the item is stale."""
        run_at, seq, job_id = item
        entry = self._entries.get(job_id)
        if entry is None or entry.seq != seq or entry.job.state is not _S.SCHEDULED:
            return None
        return entry if entry.job.run_at_ms == run_at else None

    def _promote_due(self, queue: str, now: int, limit: int) -> int:
        heap = self._scheduled.get(queue)
        promoted = 0
        while heap and promoted < limit and heap[0][0] <= now:
            entry = self._scheduled_entry(heapq.heappop(heap))
            if entry is not None:
                self._move(entry, _S.QUEUED, Transition.PROMOTE_SCHEDULED, now)
                promoted += 1
        return promoted

    def _earliest_scheduled(self, queue: str) -> int | None:
        heap = self._scheduled.get(queue)
        while heap:
            if self._scheduled_entry(heap[0]) is not None:
                return heap[0][0]
            heapq.heappop(heap)  # drop stale items so the next look is O(1)
        return None


_REDRIVABLE: Final = frozenset({_S.FAILED, _S.STOPPED})


def _holds(entry: _Entry, lease: Lease) -> bool:
    return entry.job.state is _S.RUNNING and entry.job.lease_token == lease.token


def _state_record(seq: int, job: Job, transition: str, now: int) -> _EventRecord:
    return (seq, EventKind.STATE, job.id, job.queue, now, job.state, transition, job.task,
            job.attempts, None, None, None, job.error)  # fmt: skip


def _to_event(record: _EventRecord) -> JobEvent:
    fields = dict(zip(_EVENT_FIELDS, record, strict=True))
    fields["id"] = str(fields["id"])
    return JobEvent(**fields)


__all__ = ["MemoryBroker"]
