"""The jobs a worker holds, one record per job from reserve until its outcome is stored.

:class:`HeldJobs` tracks them (keyed by lease token), starts their runs, and hands the
heartbeat (:mod:`conveyor.worker.heartbeat`) the leases to renew; the heartbeat reports back the
leases that are no longer held (the job was cancelled, deleted, or expired and re-delivered), and
the main loop cancels those runs: that is how ``cancel(job_id)`` stops a running job within
about a second on whichever worker holds it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from conveyor.job import Job, Lease
from conveyor.metrics import JobSeries

if TYPE_CHECKING:
    from conveyor.context import JobContext
    from conveyor.metrics import Metrics
    from conveyor.task import TaskRegistry
    from conveyor.worker.fetcher import Slots

logger = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    """Where an active job is between reserve and the broker recording its outcome."""

    RESERVED = 0  # reserved, its asyncio task not yet running it (a promised slot)
    RUNNING = 1  # in its executor
    COMMITTING = 2  # outcome decided, being written to the broker
    SETTLED = 3  # outcome stored (or dropped): no longer held


#: Why a run is being stopped (``ActiveJob.stop_reason``).
LEASE_LOST: Final = "lease_lost"  # cancelled, deleted or re-delivered: store nothing
SHUTDOWN: Final = "shutdown"  # the worker is stopping: give the job back with release


class Outcome(enum.StrEnum):
    """How a held job was settled; each counts in the metrics counter of the same name."""

    COMPLETED = "completed"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    RELEASED = "released"
    CANCELLED = "cancelled"  # its lease was revoked while it ran: nothing to store
    LEASE_LOST = "lease_lost"  # the broker refused the outcome: the job had moved on
    ABANDONED = "abandoned"  # not written before a shutdown deadline: lease expiry recovers it
    ERROR = "error"  # the write failed unexpectedly (logged): lease expiry recovers it

    @property
    def counter(self) -> str:
        """The metrics counter this outcome bumps."""
        return "abandoned" if self is Outcome.ERROR else self.value


class ActiveJob:
    """A job this worker holds a lease on, from reserve until its outcome is stored (or dropped).

    Attributes:
        job: the record as reserved.
        lease: the lease presented to every transition.
        kind: the executor kind its task runs on (``None`` if it cannot start).
        phase: see :class:`Phase`.
        task: the asyncio task running it.
        ctx: its context once running.
        stop_reason: why its run is being stopped (``"lease_lost"`` or ``"shutdown"``), if it is.
        waiter: set when someone (callbacks) waits for the outcome to be stored.
        promised: whether it still holds a promised executor slot (see ``fetcher.Slots``).
        series: its metrics series (cached here so settling costs no lookup).
    """

    __slots__ = (
        "ctx",
        "job",
        "kind",
        "lease",
        "phase",
        "promised",
        "series",
        "stop_reason",
        "task",
        "waiter",
    )

    def __init__(self, job: Job, lease: Lease, kind: str | None, series: JobSeries) -> None:
        self.job = job
        self.lease = lease
        self.kind = kind
        self.series = series
        self.promised = False
        self.phase = Phase.RESERVED
        self.task: asyncio.Task[None] | None = None
        self.ctx: JobContext | None = None
        self.stop_reason: str | None = None
        self.waiter: asyncio.Future[Outcome] | None = None


class HeldJobs:
    """Every job a worker holds, from reserve until its outcome is settled; the leases to renew.

    Args:
        registry: the app's tasks (to know which executor a job needs).
        metrics: counts starts, queue time and outcomes.
        slots: capacity bookkeeping shared with the fetcher.
        burst: wake the fetcher when the last held job settles (it may be drained).
        worker_id: for log lines.
    """

    def __init__(
        self,
        *,
        registry: TaskRegistry,
        metrics: Metrics,
        slots: Slots,
        burst: bool = False,
        worker_id: str = "",
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._slots = slots
        self._burst = burst
        self.worker_id = worker_id
        # Keyed by lease token, not job id: after a lease expires the same job can be
        # re-delivered to this worker while its stale run is still being stopped.
        self.active: dict[str, ActiveJob] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        #: what runs a job (the runner's ``run_job``), set once the runner exists.
        self.run_job: Callable[[ActiveJob], Coroutine[Any, Any, None]] | None = None
        #: set by the worker's stop: settling jobs then checks for ``all_done``.
        self.stopping = False
        #: set when reserving stops: a job reserved by the last fetch is parked, never started.
        self.parking = False
        self.all_done = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        return len(self.active)

    def idle(self) -> bool:
        """Whether no job is held and no run is in progress."""
        return not self.active and not self.tasks

    def spawn(self, job: Job) -> None:
        """Hold a reserved job and start its run (the fetcher's hot path)."""
        task_def = self._registry.find(job.task)
        kind = task_def.options.executor if task_def is not None else None
        series = self._metrics.series(job.queue, job.task)
        series.started += 1
        if job.started_ms is not None:
            due_ms = job.enqueued_ms if job.enqueued_ms > job.run_at_ms else job.run_at_ms
            series.queue_time.observe(max(0, job.started_ms - due_ms) / 1000)
        token = job.lease_token or ""
        aj = ActiveJob(job, Lease(job.id, job.queue, token), kind, series)
        if self.parking:
            aj.stop_reason = SHUTDOWN  # reserved by the last fetch of a shutdown: released
        self.active[token] = aj
        self._slots.promise(aj)
        assert self.run_job is not None
        task = self._loop.create_task(self.run_job(aj))
        aj.task = task
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._run_done, aj))

    def _run_done(self, aj: ActiveJob, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if aj.promised:  # cancelled before its first step: give the promised slot back
            self._slots.fulfil(aj)
            self._slots.freed()
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                logger.error(
                    "worker %s: the run of job %s failed unexpectedly",
                    self.worker_id,
                    aj.job.id,
                    exc_info=exc,
                    extra={"action": "run", "job_id": aj.job.id, "queue": aj.job.queue},
                )
        if self.stopping and not self.tasks:
            self.check_all_done()

    def settled(self, aj: ActiveJob, outcome: Outcome) -> None:
        """The committer's report: ``aj``'s outcome is stored (or dropped); no longer held."""
        if aj.phase is Phase.SETTLED:
            return
        aj.phase = Phase.SETTLED
        active = self.active
        active.pop(aj.lease.token, None)
        series = aj.series
        if outcome is Outcome.COMPLETED:
            series.completed += 1
        else:
            name = outcome.counter
            setattr(series, name, getattr(series, name) + 1)
        waiter = aj.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)
        if not active and self._burst:
            self._slots.wake.set()  # burst mode: going idle may mean drained
        if self.stopping:
            self.check_all_done()

    def check_all_done(self) -> None:
        """While stopping: set ``all_done`` once nothing runs or waits for its outcome.

        Jobs reserved by the last fetch of a shutdown never start (they are parked: RESERVED,
        their task gone) and must not hold up the grace wait; they are released right after.
        """
        if self.tasks:
            return
        if all(aj.phase is Phase.RESERVED for aj in self.active.values()):
            self.all_done.set()

    def leases(self) -> list[Lease]:
        """The leases to renew (called from the heartbeat thread: copies, no iteration races)."""
        return [aj.lease for aj in list(self.active.values())]

    def leases_lost(self, leases: list[Lease]) -> None:
        """The heartbeat found leases no longer held: stop those runs and store nothing."""
        for lease in leases:
            aj = self.active.get(lease.token)
            if aj is None or aj.phase >= Phase.COMMITTING:
                continue  # already finishing: the commit itself will learn the job moved on
            if aj.stop_reason is None:
                aj.stop_reason = LEASE_LOST
            if aj.phase is Phase.RUNNING and aj.task is not None:
                aj.task.cancel()


__all__ = ["LEASE_LOST", "SHUTDOWN", "ActiveJob", "HeldJobs", "Outcome", "Phase"]
