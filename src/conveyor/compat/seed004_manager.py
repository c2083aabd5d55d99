"""Seed 004's job manager (``QueueManagerIntegration``): add, start, stop, delete and inspect jobs.

One :class:`JobManager` owns a conveyor app on a SQLite registry, a worker running its jobs in
spawned process children (``max_concurrent_jobs`` of them), and a retention loop. Every method
is one or a few conveyor client calls; states are reported in the seed's vocabulary (see
:mod:`conveyor.compat.seed004_status`). What differs from the seed, and why, is in
``docs/seed004.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypedDict
from urllib.parse import quote

from conveyor.client import Conveyor
from conveyor.compat.seed004_job import JobBase, JobReportedError, process_entry
from conveyor.compat.seed004_limits import LimitPolicy, QueueLimits, all_jobs, check_count
from conveyor.compat.seed004_status import STATES_OF_STATUS, JobStatus, split_logs
from conveyor.errors import (
    BrokerError,
    ConfigurationError,
    ConveyorError,
    InvalidJobError,
    InvalidTransition,
    JobNotFound,
)
from conveyor.job import validate_queue_name
from conveyor.retry import RetryPolicy
from conveyor.task import Task
from conveyor.worker import Worker

__all__ = ["JobManager", "JobManagerOptions", "LimitPolicy", "QueueManagerIntegration"]

logger = logging.getLogger(__name__)

#: The longest pause between two retention passes (the seed's "every hour").
MAX_CLEANUP_INTERVAL_S: Final = 3600.0
#: How many ids of deleted jobs are remembered, so their status reads ``deleted``.
DELETED_MEMORY: Final = 10_000
_REGISTRY_FILE: Final = "registry.db"


class JobManagerOptions(TypedDict, total=False):
    """The keyword arguments of :class:`JobManager` (and of ``init_global_queue_manager``)."""

    registry_path: str | os.PathLike[str] | None
    shutdown_timeout: float
    max_concurrent_jobs: int
    in_memory: bool
    max_queue_size: int | None
    per_job_type_limits: Mapping[str, int] | None
    completed_job_retention_seconds: float
    limit_policy: LimitPolicy
    queue: str
    max_attempts: int
    job_timeout_s: float | None
    job_classes: Iterable[type[JobBase]]


class JobManager:
    """Seed 004's job manager over conveyor (the seed's ``QueueManagerIntegration``).

    ``await manager.start()`` (or ``async with``) before use, ``await manager.shutdown()`` after.
    The limits live in :attr:`limits` (:class:`~conveyor.compat.seed004_limits.QueueLimits`).

    Args:
        registry_path: the SQLite file jobs are kept in when ``in_memory`` is false (created
            with its directory if missing; the file is a SQLite database whatever its name).
        shutdown_timeout: how long shutdown waits for running jobs before stopping them (they
            go back to the queue, and run again on the next start with a persistent registry).
        max_concurrent_jobs: process children, so jobs running at once; started jobs beyond
            that wait (status ``pending``, conveyor state ``queued``).
        in_memory: keep jobs in a temporary SQLite file deleted on shutdown (``registry_path``
            is then ignored).
        max_queue_size: most jobs not finished (pending, waiting or running) at once.
        per_job_type_limits: most unfinished jobs per job type (:meth:`JobBase.type_name`).
        completed_job_retention_seconds: finished jobs (completed, failed, stopped) older than
            this are deleted by a pass every ``min(3600, retention / 6)`` s; 0 keeps them.
        limit_policy: at a limit, ``evict`` (the seed's) deletes the oldest unfinished job (of
            that type, for a per-type limit) before adding; ``reject`` raises QueueLimitReached.
        queue: the conveyor queue of this manager's jobs.
        max_attempts: runs per job (the seed runs a job once); a job's ``set_error`` is never
            retried.
        job_timeout_s: a run longer than this is stopped (its child terminated) and fails
            with reason ``timeout``; a job class's ``timeout_s`` overrides it (None: no limit).
        job_classes: classes to register at start, so that with a persistent registry jobs
            left queued by the previous run find their class (others are registered by
            :meth:`add_job`).
    """

    def __init__(
        self,
        *,
        registry_path: str | os.PathLike[str] | None = None,
        shutdown_timeout: float = 30.0,
        max_concurrent_jobs: int = 10,
        in_memory: bool = True,
        max_queue_size: int | None = None,
        per_job_type_limits: Mapping[str, int] | None = None,
        completed_job_retention_seconds: float = 21600,
        limit_policy: LimitPolicy = "evict",
        queue: str = "jobs",
        max_attempts: int = 1,
        job_timeout_s: float | None = None,
        job_classes: Iterable[type[JobBase]] = (),
    ) -> None:
        if not in_memory and registry_path is None:
            raise ConfigurationError("in_memory=False needs a registry_path for the job registry")
        check_count("max_concurrent_jobs", max_concurrent_jobs)
        check_count("max_attempts", max_attempts)
        self.limits = QueueLimits(max_queue_size, per_job_type_limits, limit_policy)
        if shutdown_timeout < 0 or completed_job_retention_seconds < 0:
            raise ConfigurationError(
                "shutdown_timeout and completed_job_retention_seconds must be >= 0"
            )
        if job_timeout_s is not None and not job_timeout_s > 0:
            raise ConfigurationError(f"job_timeout_s must be > 0 (or None), got {job_timeout_s!r}")
        self.in_memory = in_memory
        self.registry_path: str | None = (
            None if in_memory or registry_path is None else str(Path(registry_path).absolute())
        )
        self.shutdown_timeout = float(shutdown_timeout)
        self.max_concurrent_jobs = max_concurrent_jobs
        self.retention_s = float(completed_job_retention_seconds)
        self.queue = validate_queue_name(queue)
        self.max_attempts = max_attempts
        self.job_timeout_s = job_timeout_s
        self._initial_classes = list(job_classes)
        self._app: Conveyor | None = None
        self._worker: Worker | None = None
        self._temp_dir: str | None = None
        self._state = "new"  # new -> starting -> running -> stopped
        self._tasks: dict[type[JobBase], Task[Any, Any]] = {}
        self._task_names_of_type: dict[str, set[str]] = {}
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._limit_lock = asyncio.Lock()
        self._cleanup_task: asyncio.Task[None] | None = None
        self._cleanup_error: BaseException | None = None

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else self.registry_path
        return f"<JobManager {self._state} {where} max_concurrent_jobs={self.max_concurrent_jobs}>"

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running`` or ``stopped``."""
        return self._state

    @property
    def running(self) -> bool:
        """Whether the manager is started and not shut down."""
        return self._state == "running"

    @property
    def app(self) -> Conveyor:
        """The conveyor app underneath (its client API reaches everything this face hides)."""
        if self._app is None:
            raise ConfigurationError("the job manager is not started; await manager.start() first")
        return self._app

    async def start(self) -> None:
        """Open the registry, start the worker and its process children; returns once ready."""
        if self._state != "new":
            raise ConfigurationError(f"a job manager starts once; this one is {self._state}")
        self._state = "starting"
        try:
            if self.in_memory:
                self._temp_dir = await asyncio.to_thread(tempfile.mkdtemp, prefix="conveyor-jobs-")
                self.registry_path = os.path.join(self._temp_dir, _REGISTRY_FILE)
            else:
                assert self.registry_path is not None
                await asyncio.to_thread(
                    Path(self.registry_path).parent.mkdir, parents=True, exist_ok=True
                )
            # By URL, not broker=: the worker's heartbeat thread opens its own connection to it.
            app = self._app = Conveyor("sqlite:///" + quote(self.registry_path))
            for job_class in self._initial_classes:
                self.register(job_class)
            await app.connect()
            self._worker = Worker(
                app,
                queues=[self.queue],
                concurrency={"process": self.max_concurrent_jobs},
                # job classes register when first added, after the worker is built
                executors=["process"],
                grace_period_s=self.shutdown_timeout,
            )
            await self._worker.start()
        except BaseException:
            await self._close()
            self._state = "stopped"
            raise
        if self.retention_s > 0:
            self._cleanup_task = asyncio.create_task(
                self._cleanup_loop(), name=f"conveyor-jobs-cleanup-{self.queue}"
            )
            self._cleanup_task.add_done_callback(self._cleanup_ended)
        self._state = "running"
        logger.info(
            "job manager started: registry %s%s, %d process slot(s)",
            self.registry_path,
            " (temporary)" if self.in_memory else "",
            self.max_concurrent_jobs,
            extra={"action": "worker_start", "queue": self.queue},
        )

    async def shutdown(self) -> None:
        """Stop (idempotent) and close the registry (deleting it if temporary).

        Running jobs get ``shutdown_timeout`` s to finish; then they are stopped and given back
        to the queue (with a persistent registry they run again on the next start).
        """
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._cleanup_task
        await self._close()

    async def _close(self) -> None:
        if self._worker is not None:
            await self._worker.stop(grace_period_s=self.shutdown_timeout)
        if self._app is not None:
            await self._app.close()
        if self._temp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._temp_dir, True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- job classes -----------------------------------------------------------------------------

    def register(self, job_class: type[JobBase]) -> Task[Any, Any]:
        """Register ``job_class`` as a process task named ``module.QualifiedName`` (idempotent).

        The class must subclass :class:`JobBase` and be defined at module level of an
        importable module (process children import it by module and name). Needs a started
        manager; pass ``job_classes=`` to register classes as it starts.
        """
        task = self._tasks.get(job_class)
        if task is not None:
            return task
        if not (isinstance(job_class, type) and issubclass(job_class, JobBase)):
            raise ConfigurationError(
                f"job_class must be a subclass of QueueJobBase (JobBase), got {job_class!r}"
            )
        name = f"{job_class.__module__}.{job_class.__qualname__}"
        timeout_s = job_class.timeout_s if job_class.timeout_s is not None else self.job_timeout_s
        task = self.app.task(
            name=name,
            queue=self.queue,
            executor="process",
            timeout_s=timeout_s,
            # A failure the job reported itself (set_error) is final; other errors are retried
            # only if max_attempts allows.
            retry=RetryPolicy.exponential(
                max_attempts=self.max_attempts, give_up_on=[JobReportedError]
            ),
        )(process_entry(job_class))
        self._tasks[job_class] = task
        self._task_names_of_type.setdefault(job_class.type_name(), set()).add(name)
        return task

    # -- the seed's API --------------------------------------------------------------------------

    async def add_job(
        self, job_class: type[JobBase], job_id: str, params: Mapping[str, Any] | None = None
    ) -> JobStatus:
        """Add a job without starting it (status ``pending``); enforces the queue limits.

        Everything is checked before a limit evicts anything: the class, the id (non-empty,
        at most 128 chars, not in use) and the params (a JSON-compatible dict within the size
        cap). Raises ConfigurationError, InvalidJobError, PayloadError or QueueLimitReached.
        """
        app = self._require_running()
        task = self.register(job_class)
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise InvalidJobError(f"params must be a dict, got {type(params).__name__}")
        if not isinstance(job_id, str) or not job_id or len(job_id) > 128:
            raise InvalidJobError(f"invalid job id {job_id!r}; use a non-empty string <= 128 chars")
        request = app.request(task, args=[dict(params)], job_id=job_id, pending=True)
        app.broker.codec.check_payload(request.job)
        # One add at a time per manager: counting, evicting and adding must not interleave.
        async with self._limit_lock:
            if await app.get_job(job_id) is not None:
                raise InvalidJobError(
                    f"job id {job_id!r} is already in use; give each job a new id"
                )
            await self.limits.make_room(
                app,
                self.queue,
                job_class.type_name(),
                self._task_names_of_type.get(job_class.type_name(), ()),
                self._remember_deleted,
            )
            await app.enqueue_many([request])
        self._deleted.pop(job_id, None)
        return JobStatus.from_job(request.job)

    async def start_job(self, job_id: str) -> JobStatus:
        """Start a pending job: it runs as soon as a process slot is free.

        Its status stays ``pending`` until then (conveyor state ``queued``), then ``running``.
        Raises JobNotFound, or InvalidTransition if the job is not pending.
        """
        app = self._require_running()
        try:
            job = await app.start(job_id)
        except InvalidTransition:
            current = await self.get_job_status(job_id)
            raise InvalidTransition(
                f"job {job_id} is {current.status} ({current.state}); only a job added and "
                "not yet started can be started"
            ) from None
        return JobStatus.from_job(job)

    async def stop_job(self, job_id: str) -> JobStatus:
        """Stop a job: its status is ``stopped`` on return.

        A running job's process child is terminated (SIGTERM, SIGKILL after 1 s) as soon as the
        worker learns of the stop (its next heartbeat at the latest, 0.5 s). A job already
        finished is left as it is and its status returned.
        """
        app = self._require_running()
        try:
            job = await app.cancel(job_id)
        except InvalidTransition:
            return await self.get_job_status(job_id)  # finished meanwhile: nothing to stop
        except JobNotFound:
            if job_id in self._deleted:
                return JobStatus.deleted(job_id)
            raise
        return JobStatus.from_job(job)

    async def delete_job(self, job_id: str) -> JobStatus:
        """Remove a job and its logs in any state (a running one is stopped first): ``deleted``."""
        app = self._require_running()
        try:
            await app.delete(job_id)
        except JobNotFound:
            if job_id not in self._deleted:
                raise
        self._remember_deleted(job_id)
        return JobStatus.deleted(job_id)

    async def get_job_status(self, job_id: str) -> JobStatus:
        """The job's status; ``deleted`` for a job this manager deleted. Raises JobNotFound."""
        job = await self._require_running().get_job(job_id)
        if job is not None:
            return JobStatus.from_job(job)
        if job_id in self._deleted:
            return JobStatus.deleted(job_id)
        raise JobNotFound(f"no job {job_id!r}; it may have been cleaned up after its retention")

    async def get_job_logs(self, job_id: str) -> dict[str, Any]:
        """The job's captured output, split into stdout and stderr lines.

        ``{"job_id", "stdout", "stderr", "stdout_lines", "stderr_lines", "dropped_lines"}``
        (see :func:`~conveyor.compat.seed004_status.split_logs`). Raises JobNotFound.
        """
        page = await self._require_running().logs(job_id)
        return split_logs(job_id, page)

    async def list_jobs(self, status: str | None = None) -> list[JobStatus]:
        """Every job of this manager (newest first), or those with the seed ``status``."""
        if status is not None and status not in STATES_OF_STATUS:
            raise InvalidJobError(
                f"unknown status {status!r}; use one of {', '.join(STATES_OF_STATUS)}"
            )
        states = None if status is None else STATES_OF_STATUS[status]
        if states is not None and not states:
            return []  # deleted jobs have no records
        jobs = await all_jobs(self._require_running(), self.queue, states)
        return [JobStatus.from_job(job) for job in jobs]

    async def get_queue_health(self) -> dict[str, Any]:
        """The seed's health dict, counting this manager's jobs by seed status.

        ``status`` is ``healthy`` while the worker consumes and the retention loop lives.
        ``stopped_jobs`` (not in the seed) makes the counts add up to ``total_jobs``.
        """
        health: dict[str, Any] = {
            "status": "unhealthy",
            "running": self.running,
            "total_jobs": 0,
            "pending_jobs": 0,
            "running_jobs": 0,
            "completed_jobs": 0,
            "failed_jobs": 0,
            "stopped_jobs": 0,
            "registry_path": self.registry_path,
            "max_concurrent_jobs": self.max_concurrent_jobs,
        }
        if self._app is None or not self.running:
            return health
        try:
            counts = (await self._app.counts(self.queue)).get(self.queue, {})
        except ConveyorError as exc:
            health["error"] = str(exc)
            return health
        for status in ("pending", "running", "completed", "failed", "stopped"):
            health[f"{status}_jobs"] = sum(counts.get(s, 0) for s in STATES_OF_STATUS[status])
        health["total_jobs"] = sum(counts.values())
        worker_ok = self._worker is not None and bool(self._worker.health()["healthy"])
        cleanup_ok = self._cleanup_error is None
        health["status"] = "healthy" if worker_ok and cleanup_ok else "unhealthy"
        return health

    # -- retention -------------------------------------------------------------------------------

    async def cleanup(self) -> int:
        """One retention pass now: delete finished jobs older than the retention; count.

        Done periodically by the manager; does nothing when the retention is 0 (keep forever).
        """
        app = self._require_running()
        if self.retention_s <= 0:
            return 0
        removed = await app.broker.cleanup(self.retention_s, queue=self.queue)
        if removed:
            logger.info(
                "removed %d finished job(s) older than %.0f s",
                removed,
                self.retention_s,
                extra={"action": "cleanup", "queue": self.queue},
            )
        return removed

    @property
    def cleanup_interval_s(self) -> float:
        """Seconds between retention passes: ``min(3600, retention / 6)`` (0: none)."""
        return min(MAX_CLEANUP_INTERVAL_S, self.retention_s / 6)

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval_s)
            try:
                await self.cleanup()
            except BrokerError as exc:
                # Transient (the file is locked or unreachable): the next pass catches up.
                logger.warning(
                    "retention pass failed: %s; retrying in %.0f s",
                    exc,
                    self.cleanup_interval_s,
                    extra={"action": "cleanup", "queue": self.queue},
                )

    def _cleanup_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._cleanup_error = error
            logger.error(
                "the retention loop died; finished jobs are no longer cleaned up (health reports "
                "unhealthy)",
                exc_info=error,
                extra={"action": "cleanup", "queue": self.queue},
            )

    # -- helpers ---------------------------------------------------------------------------------

    def _require_running(self) -> Conveyor:
        if self._state != "running" or self._app is None:
            raise ConfigurationError(
                f"the job manager is {self._state}; await manager.start() before using it"
            )
        return self._app

    def _remember_deleted(self, job_id: str) -> None:
        self._deleted[job_id] = None
        self._deleted.move_to_end(job_id)
        while len(self._deleted) > DELETED_MEMORY:
            self._deleted.popitem(last=False)


#: The seed's name for :class:`JobManager`.
QueueManagerIntegration = JobManager
