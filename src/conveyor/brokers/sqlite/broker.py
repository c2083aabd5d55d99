"""The SQLite broker: the broker contract on one SQLite file, safe for several processes.

Durability: WAL with ``synchronous=NORMAL`` (the default) makes every committed transition survive a
crash of the process; on power loss or an OS crash the last commits may be lost (the file stays
consistent). ``?synchronous=full`` fsyncs every commit, so an acknowledged transition survives
power loss too, at a cost in throughput.

Waiting: SQLite cannot notify. Changes made through this broker wake its ``wait_for_jobs`` and
``subscribe`` callers at once; changes made by other processes are noticed by a bounded poll every
``poll_interval_ms`` (default 50 ms). That poll is the one place conveyor polls, and only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar, Concatenate, Final, ParamSpec, TypeVar

from conveyor.brokers.base import (
    DEFAULT_EVENT_RETENTION,
    DEFAULT_MAX_LOG_LINES,
    PURGEABLE_STATES,
    Broker,
    BrokerCapabilities,
    ExpiredReport,
    JobEvent,
    JobPage,
    LogPage,
    parse_int,
    parse_states,
)
from conveyor.brokers.sqlite.connection import Database
from conveyor.brokers.sqlite.options import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_POLL_INTERVAL_MS,
    SQLiteOptions,
    Synchronous,
    parse_url,
)
from conveyor.brokers.sqlite.transitions import Transitions
from conveyor.clock import Clock
from conveyor.codec import Codec
from conveyor.errors import BrokerUnavailable, ConfigurationError, InvalidJobError
from conveyor.job import FailureReason, Job, JobState, Lease

P = ParamSpec("P")
T = TypeVar("T")

_MAX_DESCRIPTION: Final = 1024
_EVENT_PAGE: Final = 500
#: keyword arguments that may also come from the URL's query
_URL_OPTIONS: Final = frozenset(
    {"path", "synchronous", "busy_timeout_ms", "poll_interval_ms", "read_only"}
)


class _Signal:
    """A broadcast wake-up: waiters take :meth:`current` *before* looking, then wait on it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(timeout_s, 0.0)):
            await event.wait()


class SQLiteBroker(Broker):
    """A durable broker in one SQLite file that several worker processes can share.

    Open it with ``open_broker("sqlite:///path.db?synchronous=full")`` or construct it directly.

    Args:
        path: the database file; created (mode 0600) if missing, its directory must exist.
        synchronous: ``normal`` (survives a process crash) or ``full`` (survives power loss).
        busy_timeout_ms: how long to wait for another process's write lock before a transition
            fails with :class:`~conveyor.errors.BrokerReadOnly`.
        poll_interval_ms: how often waiters look for changes made by other processes.
        read_only: open an existing file read-only; transitions raise BrokerReadOnly.
        clock: source of epoch-ms time (default: the system clock).
        codec: payload encoder and size cap (default: JSON, 1 MiB); recorded in the file.
        max_log_lines: log lines kept per job; older ones are dropped and counted.
        event_retention: how many recent events are kept for resuming subscribers (a live
            subscriber that falls further behind than this misses the oldest ones).
    """

    scheme: ClassVar[str] = "sqlite"
    capabilities: ClassVar[BrokerCapabilities] = BrokerCapabilities(durable=True, shared=True)

    def __init__(
        self,
        path: str,
        *,
        synchronous: Synchronous = "normal",
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS,
        read_only: bool = False,
        clock: Clock | None = None,
        codec: Codec | None = None,
        max_log_lines: int = DEFAULT_MAX_LOG_LINES,
        event_retention: int = DEFAULT_EVENT_RETENTION,
    ) -> None:
        super().__init__(
            clock=clock, codec=codec, max_log_lines=max_log_lines, event_retention=event_retention
        )
        for name, value in (("max_log_lines", max_log_lines), ("event_retention", event_retention)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
        self.options = SQLiteOptions(
            path=path,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            poll_interval_ms=poll_interval_ms,
            read_only=read_only,
        )
        self._db = Database(self.options, payload_format=self.codec.format)
        self._ops = Transitions(
            codec=self.codec,
            clock=self.clock,
            max_log_lines=max_log_lines,
            event_retention=event_retention,
        )
        self._poll_s = poll_interval_ms / 1000
        self._written = _Signal()  # any write: subscribers look for new events
        self._ready = _Signal()  # a write that may make jobs reservable: fetchers look again
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBroker:
        """Build a broker from ``sqlite:///PATH?...``; ``options`` are constructor keywords.

        A setting given both in the URL and as a keyword must agree.
        """
        parsed = parse_url(url)
        for name, value in parsed.items():
            if name in options and options[name] != value:
                raise ConfigurationError(
                    f"{name} is set to {value!r} in the URL and to {options[name]!r} as an "
                    "argument; give it once"
                )
        known = _URL_OPTIONS | {"clock", "codec", "max_log_lines", "event_retention"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown SQLite broker option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known - {'path'}))}"
            )
        merged = {**options, **parsed}
        return cls(merged.pop("path"), **merged)

    @property
    def path(self) -> str:
        """The database file (absolute)."""
        return self.options.path

    def __repr__(self) -> str:
        return f"SQLiteBroker({self.options.path!r})"

    # -- plumbing --------------------------------------------------------------------------------

    async def _write(
        self,
        ready: bool,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run a transition; then wake subscribers (and fetchers if jobs may have become ready)."""
        try:
            return await self._db.write(fn, *args, **kwargs)
        finally:
            # Even on failure or cancellation: the transaction may have committed, and a
            # spurious wake-up costs one query.
            self._written.fire()
            if ready:
                self._ready.fire()

    # -- lifecycle -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the file (creating it and the schema if needed); idempotent.

        Raises ConfigurationError for a bad path, a non-conveyor or newer-schema file;
        BrokerReadOnly or BrokerUnavailable if the file cannot be written or opened.
        """
        await self._db.open()
        self._closed = False

    async def close(self) -> None:
        """Close the file and end every subscription and wait; idempotent, never raises."""
        self._closed = True
        self._written.fire()
        self._ready.fire()
        await self._db.close()

    async def ping(self) -> None:
        """Read from the file; raises BrokerUnavailable if it cannot."""
        await self._db.read(Transitions.ping)

    # -- producers -------------------------------------------------------------------------------

    async def _enqueue(self, jobs: list[Job]) -> list[str]:
        return await self._write(True, self._ops.enqueue, jobs)

    async def start(self, job_id: str) -> Job:
        """``pending`` -> ``queued`` (or ``scheduled`` if its run_at is in the future)."""
        return await self._write(True, self._ops.start, job_id)

    # -- consumers -------------------------------------------------------------------------------

    async def reserve(
        self, queue: str, n: int, *, lease_s: float, worker_id: str = ""
    ) -> list[Job]:
        """Take up to ``n`` due jobs of ``queue`` (promoting its due scheduled jobs first)."""
        lease_ms = round(lease_s * 1000)
        return await self._write(False, self._ops.reserve, queue, n, lease_ms, worker_id or None)

    async def wait_for_jobs(self, queues: Sequence[str], timeout_s: float) -> None:
        """Block until a job of ``queues`` may be reservable, or ``timeout_s`` passes.

        Woken at once by this broker's own writes; other processes' writes are seen by a poll
        every ``poll_interval_ms``. The earliest scheduled job shortens the wait.
        """
        if self._closed or timeout_s <= 0:
            return
        queues = list(queues)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._closed:
            woken = self._ready.current()
            ready, earliest = await self._db.read(Transitions.wait_state, queues)
            now = self.clock.now_ms()
            if ready or (earliest is not None and earliest <= now):
                return
            wait_s = min(deadline - loop.time(), self._poll_s)
            if wait_s <= 0:
                return
            if earliest is not None:
                # With a FakeClock this is fake time read as a real wait: still a valid bound.
                wait_s = min(wait_s, (earliest - now) / 1000)
            await _wait(woken, wait_s)

    async def extend_lease(self, leases: Sequence[Lease], lease_s: float) -> list[bool]:
        """Push each held lease's deadline to now + lease_s; False for leases no longer held."""
        if not leases:
            return []
        return await self._write(False, self._ops.extend_lease, list(leases), round(lease_s * 1000))

    def _encode_result(self, lease: Lease, result: Any) -> bytes | None:
        if result is None:
            return None
        return self.codec.check_value(result, what=f"job {lease.job_id} result")

    async def ack(self, lease: Lease, result: Any = None) -> None:
        """``running`` -> ``completed`` with ``result``; charges the attempt."""
        data = self._encode_result(lease, result)
        await self._write(False, self._ops.ack, lease, data)

    async def ack_many(self, items: Sequence[tuple[Lease, Any]]) -> list[bool]:
        """Ack several jobs in one transaction; per item, False if its lease is stale.

        Results are encoded before anything changes, so an unencodable one raises and acks nothing.
        """
        if not items:
            return []
        encoded = [(lease, self._encode_result(lease, result)) for lease, result in items]
        return await self._write(False, self._ops.ack_many, encoded)

    async def ack_and_reserve(
        self,
        acks: Sequence[tuple[Lease, Any]],
        queue: str,
        n: int,
        *,
        lease_s: float,
        worker_id: str = "",
    ) -> tuple[list[bool], list[Job]]:
        """:meth:`ack_many` of ``acks`` (leases of ``queue``), then :meth:`reserve`: one commit.

        One trip to the database thread and one commit instead of two of each.
        """
        self._check_ack_queue(acks, queue)
        encoded = [(lease, self._encode_result(lease, result)) for lease, result in acks]
        lease_ms = round(lease_s * 1000)
        return await self._write(
            False, self._ops.ack_and_reserve, encoded, queue, n, lease_ms, worker_id or None
        )

    async def retry(
        self,
        lease: Lease,
        *,
        run_at_ms: int,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``scheduled`` at ``run_at_ms`` (``queued`` if due); charges one."""
        return await self._write(True, self._ops.retry, lease, int(run_at_ms), error, traceback)

    async def dead_letter(
        self,
        lease: Lease,
        *,
        reason: FailureReason,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``failed`` (dead letters) with reason, error, traceback; charges one."""
        return await self._write(False, self._ops.dead_letter, lease, str(reason), error, traceback)

    async def release(self, lease: Lease) -> Job:
        """``running`` -> ``queued`` at once, charging nothing; the job keeps its FIFO place."""
        return await self._write(True, self._ops.release, lease)

    async def requeue_expired(self, queue: str, *, limit: int = 1000) -> ExpiredReport:
        """Recover running jobs of ``queue`` whose lease deadline has passed."""
        return await self._write(True, self._ops.requeue_expired, queue, max(limit, 0))

    async def promote_scheduled(self, queue: str, *, limit: int = 1000) -> int:
        """``scheduled`` -> ``queued`` for jobs of ``queue`` whose ``run_at_ms`` has come; count."""
        return await self._write(True, self._ops.promote_scheduled, queue, max(limit, 0))

    async def next_scheduled_ms(self, queue: str) -> int | None:
        """The earliest ``run_at_ms`` of the scheduled jobs of ``queue``, or None."""
        _, earliest = await self._db.read(Transitions.wait_state, [queue])
        return earliest

    # -- control plane ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Stop a live job (a running one loses its lease at once); returns the stopped job."""
        return await self._write(False, self._ops.cancel, job_id)

    async def delete(self, job_id: str) -> None:
        """Remove a job in any state, with its logs; a running job's lease goes with it."""
        await self._write(False, self._ops.delete, job_id)

    async def redrive(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """Dead letters (and, by id, stopped jobs) of ``queue`` back to ``queued``, reset.

        A job whose ``dedup_key`` another live job holds now is re-driven without it.
        """
        ids = None if job_ids is None else list(dict.fromkeys(job_ids))
        if ids == []:
            return 0
        return await self._write(True, self._ops.redrive, queue, ids)

    async def purge(self, queue: str, states: Iterable[JobState] | None = None) -> int:
        """Delete the jobs of ``queue`` in ``states`` (default: pending, queued, scheduled)."""
        wanted = PURGEABLE_STATES if states is None else parse_states(states)
        if JobState.RUNNING in wanted:
            raise InvalidJobError(
                "purge never removes running jobs; cancel them first, then purge 'stopped'"
            )
        if not wanted:
            return 0
        return await self._write(False, self._ops.purge, queue, sorted(wanted))

    async def cleanup(self, retention_s: float, *, queue: str | None = None) -> int:
        """Delete finished jobs that finished more than ``retention_s`` ago."""
        return await self._write(False, self._ops.cleanup, round(retention_s * 1000), queue)

    # -- progress and logs -----------------------------------------------------------------------

    async def set_progress(
        self, lease: Lease, progress: int | None = None, description: str | None = None
    ) -> None:
        """Record a running job's progress (clamped to 0-100) and/or description (cut to 1024)."""
        clamped = None if progress is None else max(0, min(100, int(progress)))
        cut = None if description is None else str(description)[:_MAX_DESCRIPTION]
        await self._write(False, self._ops.set_progress, lease, clamped, cut)

    async def append_log(self, lease: Lease, lines: Sequence[str], *, dropped: int = 0) -> None:
        """Append log lines to a job (the token is not checked; the job must exist)."""
        if isinstance(lines, str):  # a lone string would otherwise be logged a character per line
            lines = [lines]
        texts = [str(x) for x in lines]
        await self._write(False, self._ops.append_log, lease.job_id, texts, max(0, dropped))

    async def logs(self, job_id: str, *, offset: int = 0, limit: int | None = None) -> LogPage:
        """A job's kept log lines from ``offset`` (0 = oldest kept)."""
        if offset < 0 or (limit is not None and limit < 0):
            raise InvalidJobError("logs offset and limit must be >= 0")
        return await self._db.read(Transitions.logs, job_id, offset, limit)

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return await self._db.read(self._ops.get, job_id)

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
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidJobError(f"list_jobs limit must be 1-1000, got {limit!r}")
        wanted = None if states is None else sorted(str(s) for s in parse_states(states))
        before = None if cursor is None else parse_int(cursor, "cursor", "SQLite")
        jobs, next_seq = await self._db.read(
            self._ops.list_jobs, queue, wanted, task, limit, before
        )
        return JobPage(jobs=jobs, next_cursor=None if next_seq is None else str(next_seq))

    async def counts(self, queue: str | None = None) -> dict[str, dict[JobState, int]]:
        """Per queue, the number of jobs in each state; a named queue always gets its row."""
        return await self._db.read(Transitions.counts, queue)

    async def queues(self) -> list[str]:
        """Names of the queues that have (or had) jobs, sorted."""
        return await self._db.read(Transitions.queue_names)

    # -- events ----------------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        queue: str | None = None,
        job_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[JobEvent]:
        """Stream job events; "new" means published after this call. Ends when the broker closes.

        Events of other processes arrive within ``poll_interval_ms``.
        """
        if after is not None:
            return self._stream(parse_int(after, "event id", "SQLite"), queue, job_id)
        # Queued on the database thread now, so every write this process submits after this
        # call is ordered after the cursor read, even before the iterator is first awaited.
        start = self._db.submit(False, Transitions.last_event_id)
        return self._stream(start, queue, job_id)

    async def _stream(
        self,
        start: int | Future[int],
        queue: str | None,
        job_id: str | None,
    ) -> AsyncIterator[JobEvent]:
        position = start if isinstance(start, int) else await asyncio.wrap_future(start)
        while not self._closed:
            woken = self._written.current()
            try:
                events, position = await self._db.read(
                    Transitions.events_after, position, queue, job_id, _EVENT_PAGE
                )
            except BrokerUnavailable:
                if self._db.is_open:
                    raise
                return  # closed while reading: the stream ends, as documented
            for event in events:
                yield event
            if len(events) < _EVENT_PAGE:
                await _wait(woken, self._poll_s)
