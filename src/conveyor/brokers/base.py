"""The broker contract: every method is a job-state transition (or a read), enforced by all.

Rules shared by all brokers (the conformance suite in ``tests/conformance/`` checks every broker):

* Each transition is atomic: one Lua script (Redis), one ``BEGIN IMMEDIATE`` transaction (SQLite),
  or one uninterrupted block on the event loop (memory).
* Transitions that a worker makes on a running job present the :class:`~conveyor.job.Lease` that
  :meth:`Broker.reserve` handed out. A stale token (the lease expired and the job was requeued or
  re-delivered, or the job was cancelled or otherwise left ``running``) raises
  :class:`~conveyor.errors.LeaseLost`; a missing job (never enqueued, or deleted) raises
  :class:`~conveyor.errors.JobNotFound`. Nothing changes in either case.
* Time comes from the broker's :class:`~conveyor.clock.Clock` (epoch ms), so tests drive leases and
  schedules with a :class:`~conveyor.clock.FakeClock`.
* Every state change, progress update and log line is published as a :class:`JobEvent`, in order per
  job, readable through :meth:`Broker.subscribe` and resumable from an event id.
* Driver exceptions never escape: an unreachable server raises
  :class:`~conveyor.errors.BrokerUnavailable` (bounded by a timeout), a read-only or locked store
  :class:`~conveyor.errors.BrokerReadOnly`.
* Attempt accounting: ``attempts`` counts charged runs. ``ack``, ``retry``, ``dead_letter`` and
  ``requeue_expired`` charge one; ``release`` charges nothing; ``reserve`` does not change it,
  so the run in progress is attempt number ``attempts + 1``.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Final, Self

import msgspec

from conveyor.clock import Clock, SystemClock
from conveyor.codec import Codec
from conveyor.errors import InvalidJobError
from conveyor.job import (
    FailureReason,
    Job,
    JobState,
    Lease,
    Priority,
    validate_queue_name,
    validate_task_name,
)

#: States :meth:`Broker.purge` removes when none are named: work that has not started.
PURGEABLE_STATES: Final = frozenset({JobState.PENDING, JobState.QUEUED, JobState.SCHEDULED})

DEFAULT_MAX_LOG_LINES: Final = 1000
DEFAULT_EVENT_RETENTION: Final = 10_000


class BrokerCapabilities(msgspec.Struct, frozen=True):
    """What a broker can do; the conformance suite reads this instead of skipping ad hoc.

    Attributes:
        durable: an acknowledged enqueue survives the process that made it.
        shared: several processes (or machines) can use the same broker at once.
    """

    durable: bool
    shared: bool


class EventKind(enum.StrEnum):
    """What a :class:`JobEvent` reports."""

    STATE = "state"  # the job entered ``state`` through ``transition``
    PROGRESS = "progress"  # progress and/or description changed
    LOG = "log"  # a log line was appended
    DELETED = "deleted"  # the job was deleted (or removed by purge or cleanup)


class JobEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One change to one job, as published by the broker.

    ``id`` is an opaque, broker-specific cursor: pass the last one seen to
    :meth:`Broker.subscribe` as ``after`` to resume without gaps (within the broker's retention).
    """

    id: str
    kind: EventKind
    job_id: str
    queue: str
    ts_ms: int
    state: JobState | None = None
    transition: str | None = None
    task: str | None = None
    attempts: int | None = None
    progress: int | None = None
    description: str | None = None
    line: str | None = None
    error: str | None = None


class JobPage(msgspec.Struct):
    """One page of :meth:`Broker.list_jobs`, newest first; ``next_cursor`` asks for the next."""

    jobs: list[Job]
    next_cursor: str | None


class LogPage(msgspec.Struct):
    """A job's captured log lines (oldest first), and how many older lines were dropped by the cap.

    ``total`` is the number of lines kept (what ``offset`` indexes), so lines ever appended is
    ``total + dropped``.
    """

    lines: list[str]
    dropped: int
    total: int


class ExpiredReport(msgspec.Struct):
    """What :meth:`Broker.requeue_expired` did: jobs put back in the queue, jobs dead-lettered."""

    requeued: list[str]
    dead_lettered: list[str]


class Broker(abc.ABC):
    """Where jobs live and change state. Subclasses implement the transitions atomically.

    Args:
        clock: source of epoch-ms time (default: the system clock).
        codec: payload encoder and size cap (default: JSON, 1 MiB).
        max_log_lines: log lines kept per job; older ones are dropped and counted.
        event_retention: how many recent events are kept for resuming subscribers.
    """

    capabilities: ClassVar[BrokerCapabilities]
    #: the URL scheme(s) this broker is opened with
    scheme: ClassVar[str]

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        codec: Codec | None = None,
        max_log_lines: int = DEFAULT_MAX_LOG_LINES,
        event_retention: int = DEFAULT_EVENT_RETENTION,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.codec: Codec = codec or Codec()
        self.max_log_lines = max_log_lines
        self.event_retention = event_retention

    # -- lifecycle -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections and create the schema; idempotent. Raises BrokerUnavailable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every resource; idempotent, bounded, never raises for an unreachable server."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Check the broker answers; raises BrokerUnavailable (bounded by the broker's timeout)."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- producers -------------------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[Job]) -> list[str]:
        """Add jobs, all or nothing; return each job's id in order.

        The whole batch is validated before anything is written (queue and task names, priority,
        attempts, payload encodability and size), so one bad job writes nothing. A job whose
        ``dedup_key`` matches a live (pending, queued, scheduled or running) job of the same queue
        is not added: its position in the result holds the live job's id instead. Two jobs of one
        batch with the same key collapse into the first.

        The stored state is ``pending`` if the job was given ``state=pending`` (held until
        :meth:`start`), ``scheduled`` if ``run_at_ms`` is in the future, else ``queued``.
        ``enqueued_ms`` is set from the clock (and ``run_at_ms`` to it when unset).
        """
        if not jobs:
            return []
        prepared = [self._prepare(job) for job in jobs]
        return await self._enqueue(prepared)

    def _prepare(self, job: Job) -> Job:
        """Validate one job for enqueue; return the record to store (the input is not changed)."""
        if not isinstance(job, Job):
            raise InvalidJobError(f"enqueue takes Job records, got {type(job).__name__}")
        if not job.id or not isinstance(job.id, str) or len(job.id) > 128:
            raise InvalidJobError(
                f"invalid job id {job.id!r}; use a non-empty string of <= 128 chars"
            )
        validate_queue_name(job.queue)
        validate_task_name(job.task)
        priority = Priority.parse(job.priority)
        if not isinstance(job.max_attempts, int) or job.max_attempts < 1:
            raise InvalidJobError(f"max_attempts must be an integer >= 1, got {job.max_attempts!r}")
        if job.timeout_s is not None and not job.timeout_s > 0:
            raise InvalidJobError(f"timeout_s must be > 0 when given, got {job.timeout_s!r}")
        if job.dedup_key is not None and (not job.dedup_key or len(job.dedup_key) > 512):
            raise InvalidJobError("dedup_key must be a non-empty string of <= 512 chars")
        if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
            raise InvalidJobError("args must be a list and kwargs a dict")
        self.codec.check_payload(job)
        now = self.clock.now_ms()
        run_at = job.run_at_ms or now
        if job.state is JobState.PENDING:
            state = JobState.PENDING
        elif run_at > now:
            state = JobState.SCHEDULED
        else:
            state = JobState.QUEUED
        return msgspec.structs.replace(
            job,
            priority=priority,
            state=state,
            enqueued_ms=now,
            run_at_ms=run_at,
            attempts=0,
            lost_leases=0,
            started_ms=None,
            finished_ms=None,
            result=None,
            error=None,
            traceback=None,
            failure_reason=None,
            lease_token=None,
            lease_expires_ms=None,
            worker_id=None,
        )

    @abc.abstractmethod
    async def _enqueue(self, jobs: list[Job]) -> list[str]:
        """Store already-validated jobs atomically (per queue at least); see :meth:`enqueue`."""

    @abc.abstractmethod
    async def start(self, job_id: str) -> Job:
        """``pending`` -> ``queued`` (or ``scheduled`` if its run_at is in the future).

        Raises JobNotFound, or InvalidTransition if the job is not pending.
        """

    # -- consumers -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(
        self, queue: str, n: int, *, lease_s: float, worker_id: str = ""
    ) -> list[Job]:
        """Take up to ``n`` due jobs of ``queue``: ``queued`` -> ``running``.

        Order: priority (high, normal, low), then FIFO by enqueue order within a priority.
        Each returned job carries a fresh ``lease_token`` and ``lease_expires_ms`` = now + lease_s,
        and ``started_ms`` = now. Scheduled jobs are not reserved before :meth:`promote_scheduled`
        makes them queued (brokers may promote due jobs of this queue first, in the same step).
        """

    @abc.abstractmethod
    async def wait_for_jobs(self, queues: Sequence[str], timeout_s: float) -> None:
        """Return when a job may have become reservable on one of ``queues``, or after the timeout.

        A hint for the fetcher so that it blocks instead of polling; spurious wake-ups are allowed.
        Scheduled jobs falling due count as becoming reservable.
        """

    @abc.abstractmethod
    async def extend_lease(self, leases: Sequence[Lease], lease_s: float) -> list[bool]:
        """Push each lease's deadline to now + lease_s; per lease, False if it is no longer held.

        A lease is no longer held when the job is gone, not running, or has another token
        (cancelled, deleted, or expired and re-delivered). Never raises for such leases.
        """

    @abc.abstractmethod
    async def ack(self, lease: Lease, result: Any = None) -> None:
        """``running`` -> ``completed`` with ``result``; charges the attempt. Stale: LeaseLost."""

    async def ack_many(self, items: Sequence[tuple[Lease, Any]]) -> list[bool]:
        """Ack several jobs in as few round trips as the broker allows; per item, False if stale.

        Brokers override this with a batched form; the default acks one by one.
        """
        from conveyor.errors import JobNotFound, LeaseLost

        out: list[bool] = []
        for lease, result in items:
            try:
                await self.ack(lease, result)
            except (LeaseLost, JobNotFound):
                out.append(False)
            else:
                out.append(True)
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
        """A worker's "finish and take next": :meth:`ack_many` of ``acks``, then :meth:`reserve`.

        The same two transitions with the same fencing (per ack, False if its lease is stale or
        the job is gone) and the same reserve rules, in one step: one Lua call (Redis), one
        transaction (SQLite), one block (memory). It exists for the worker's critical path, where
        the slots freed by finished jobs are refilled: one round trip instead of two, and the
        acks no longer queue behind (or ahead of) the reserve.

        Every lease in ``acks`` must belong to ``queue`` (a queue is the broker's atomic unit);
        other leases raise InvalidJobError and change nothing. Results are encoded before
        anything changes, so an unencodable one raises and nothing is acked or reserved.
        ``n`` may be 0 (ack only). Returns the per-ack flags and the reserved jobs.
        """
        self._check_ack_queue(acks, queue)
        held = await self.ack_many(acks) if acks else []
        jobs = await self.reserve(queue, n, lease_s=lease_s, worker_id=worker_id) if n > 0 else []
        return held, jobs

    @staticmethod
    def _check_ack_queue(acks: Sequence[tuple[Lease, Any]], queue: str) -> None:
        """Refuse (before any change) an ``ack_and_reserve`` ack of another queue."""
        for lease, _ in acks:
            if lease.queue != queue:
                raise InvalidJobError(
                    f"ack_and_reserve({queue!r}) got a lease of queue {lease.queue!r} "
                    f"(job {lease.job_id}); ack it with ack_many"
                )

    @abc.abstractmethod
    async def retry(
        self,
        lease: Lease,
        *,
        run_at_ms: int,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``scheduled`` at ``run_at_ms`` (``queued`` if already due); charges one.

        The worker's retry policy decides whether to retry; the broker records it. The lease is
        cleared. Stale token: LeaseLost. Returns the updated job.
        """

    @abc.abstractmethod
    async def dead_letter(
        self,
        lease: Lease,
        *,
        reason: FailureReason,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``failed`` (dead letters) with reason, error, traceback; charges one."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> Job:
        """``running`` -> ``queued`` at once, charging nothing (graceful shutdown gives work back).

        The job keeps its place by priority and original enqueue order. Stale token: LeaseLost.
        """

    @abc.abstractmethod
    async def requeue_expired(self, queue: str, *, limit: int = 1000) -> ExpiredReport:
        """Recover running jobs of ``queue`` whose lease deadline has passed (their worker died).

        Each charges an attempt and a lost lease. It goes to ``failed`` with reason ``poison`` once
        ``lost_leases`` reaches ``max_lost_leases``, with reason ``exhausted`` once ``attempts``
        reaches ``max_attempts``, else back to ``queued`` at once (no backoff: the fault was the
        worker's). Its lease token is cleared, so the dead worker's late ack is rejected.
        """

    @abc.abstractmethod
    async def promote_scheduled(self, queue: str, *, limit: int = 1000) -> int:
        """``scheduled`` -> ``queued`` for jobs of ``queue`` whose ``run_at_ms`` has come; count."""

    @abc.abstractmethod
    async def next_scheduled_ms(self, queue: str) -> int | None:
        """The earliest ``run_at_ms`` among the ``scheduled`` jobs of ``queue`` (None: none).

        A burst worker reads it to tell a retry in backoff (due soon: wait for it) from work
        scheduled far ahead (not its business), without listing every scheduled job.
        """

    # -- control plane ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> Job:
        """Stop a job: pending/queued/scheduled/running -> ``stopped``; returns the stopped job.

        A running job's lease is revoked at once (its worker learns through the event stream or its
        next heartbeat, stops the work, and its late ack is rejected). Nothing is retried.
        Raises JobNotFound, or InvalidTransition for a finished job.
        """

    @abc.abstractmethod
    async def delete(self, job_id: str) -> None:
        """Remove a job in any state, with its logs; a running job's lease is revoked.

        Publishes a ``deleted`` event. Raises JobNotFound.
        """

    @abc.abstractmethod
    async def redrive(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Dead letters back to work: ``failed`` (or, by id, ``stopped``) -> ``queued``.

        Attempts, lost leases, error, traceback and failure reason are reset. With no ids, every
        failed job of ``queue`` is re-driven. Ids that are not failed/stopped in that queue are
        skipped. A job reclaims its ``dedup_key`` if the key is free; if another live job holds
        it now (or an earlier job of the same redrive claims it), the job is re-driven without
        it (its ``dedup_key`` becomes None): nothing is skipped, and one key keeps at most one
        live job. Returns how many were re-driven.
        """

    @abc.abstractmethod
    async def purge(self, queue: str, states: Iterable[JobState] | None = None) -> int:
        """Delete the jobs of ``queue`` in ``states`` (default: pending, queued, scheduled); count.

        Running jobs are never purged (cancel them instead): ``running`` in ``states`` raises
        InvalidJobError.
        """

    @abc.abstractmethod
    async def cleanup(self, retention_s: float, *, queue: str | None = None) -> int:
        """Delete finished jobs (completed, failed, stopped) that ended over ``retention_s`` ago."""

    # -- progress and logs -----------------------------------------------------------------------

    @abc.abstractmethod
    async def set_progress(
        self, lease: Lease, progress: int | None = None, description: str | None = None
    ) -> None:
        """Record a running job's progress (clamped to 0-100) and/or description.

        A description longer than 1024 chars is cut to 1024. Stale token: LeaseLost.
        """

    @abc.abstractmethod
    async def append_log(self, lease: Lease, lines: Sequence[str], *, dropped: int = 0) -> None:
        """Append log lines to a job (kept: the newest ``max_log_lines``; dropped ones counted).

        ``dropped`` counts lines older than ``lines`` that the caller already let go (a worker's
        buffer overflowing between flushes): they are added to the job's dropped count, so
        kept + dropped is always every line the job logged. The token is not checked (lines from
        a job's last moments are kept even if it was just cancelled); the job must exist
        (JobNotFound).
        """

    @abc.abstractmethod
    async def logs(self, job_id: str, *, offset: int = 0, limit: int | None = None) -> LogPage:
        """A job's kept log lines from ``offset`` (0 = oldest kept). Raises JobNotFound."""

    # -- reads -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        states: Iterable[JobState] | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs matching the filters, newest enqueue first, ``limit`` per page (1-1000)."""

    @abc.abstractmethod
    async def counts(self, queue: str | None = None) -> dict[str, dict[JobState, int]]:
        """Per queue, the number of jobs in each state (every state present, zeros included)."""

    @abc.abstractmethod
    async def queues(self) -> list[str]:
        """Names of the queues that have (or had) jobs, sorted."""

    # -- events ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def subscribe(
        self,
        *,
        queue: str | None = None,
        job_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[JobEvent]:
        """Stream job events, optionally of one queue or one job, in order per job, without end.

        With ``after`` (an event id seen before), events after it that are still retained are
        replayed first; without it, only new events arrive. The iterator never blocks the event
        loop; close it (``aclose``) or cancel its consumer to stop. It ends when the broker closes.
        """


def all_states_zero() -> dict[JobState, int]:
    """A counts row with every state at zero."""
    return dict.fromkeys(JobState, 0)


def parse_states(states: Iterable[JobState | str]) -> frozenset[JobState]:
    """States given by value or name (a single string is one state); InvalidJobError lists them."""
    if isinstance(states, str):
        states = [states]
    try:
        return frozenset(JobState(s) for s in states)
    except ValueError as exc:
        raise InvalidJobError(f"{exc}; use states from: {', '.join(JobState)}") from None


def parse_int(value: str, what: str, broker: str) -> int:
    """An integer cursor or event id that ``broker`` handed out; InvalidJobError otherwise."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidJobError(
            f"invalid {what} {value!r} for the {broker} broker; pass one it returned"
        ) from None
