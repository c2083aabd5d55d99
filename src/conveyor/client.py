"""The application object: define tasks, enqueue jobs, and inspect, wait for or cancel them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, overload

import msgspec

from conveyor.brokers import DEFAULT_URL, open_broker
from conveyor.brokers.base import Broker, JobPage, LogPage
from conveyor.errors import InvalidJobError, JobFailed, JobNotFound, JobTimeout
from conveyor.job import Job, JobState, Priority, new_job_id, validate_queue_name
from conveyor.retry import DEFAULT_MAX_ATTEMPTS, RetryPolicy
from conveyor.task import (
    P,
    R,
    Task,
    TaskOptions,
    TaskRegistry,
    callback_name,
    make_options,
)

if TYPE_CHECKING:
    from conveyor.sync import SyncClient

T = TypeVar("T")

#: Environment variable naming the broker URL when none is passed.
URL_ENV = "CONVEYOR_URL"


class JobRequest(msgspec.Struct, frozen=True):
    """A job ready to be enqueued, built by :meth:`Conveyor.request`; see :meth:`enqueue_many`."""

    job: Job


class Conveyor:
    """A conveyor application: a broker plus the tasks registered on it.

    Args:
        url: broker URL (default: ``$CONVEYOR_URL`` or ``sqlite:///conveyor.db``).
        broker: an already-built broker (instead of ``url``).
        default_queue: queue for tasks that name none.
        **broker_options: passed to the broker (``clock``, ``codec``, ``max_log_lines`` ...).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        broker: Broker | None = None,
        default_queue: str = "default",
        **broker_options: Any,
    ) -> None:
        self.url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.broker: Broker = broker or open_broker(self.url, **broker_options)
        self.default_queue = validate_queue_name(default_queue)
        self.registry = TaskRegistry()
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self._sync: SyncClient | None = None

    def __repr__(self) -> str:
        return f"<Conveyor broker={type(self.broker).__name__} tasks={len(self.registry)}>"

    # -- tasks -----------------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: str | Priority = Priority.NORMAL,
        retry: RetryPolicy | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        executor: str | None = None,
        on_success: Task[..., Any] | str | None = None,
        on_failure: Task[..., Any] | str | None = None,
        max_lost_leases: int = 3,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: str | Priority = Priority.NORMAL,
        retry: RetryPolicy | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        executor: str | None = None,
        on_success: Task[..., Any] | str | None = None,
        on_failure: Task[..., Any] | str | None = None,
        max_lost_leases: int = 3,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task: ``@app.task`` or ``@app.task(queue=..., retry=...)``.

        The executor defaults to ``async`` for ``async def`` and ``thread`` for plain functions.
        A first parameter named ``ctx`` (or typed :class:`~conveyor.context.JobContext`) receives
        the job context and is not part of the enqueue signature.
        """

        def register(f: Callable[P, R]) -> Task[P, R]:
            options = make_options(
                queue=queue or self.default_queue,
                priority=priority,
                retry=retry,
                max_attempts=max_attempts,
                timeout_s=timeout_s,
                executor=executor,
                fn=f,
                on_success=callback_name(on_success),
                on_failure=callback_name(on_failure),
                max_lost_leases=max_lost_leases,
            )
            task: Task[P, R] = Task(self, f, name or f"{f.__module__}.{f.__qualname__}", options)
            self.registry.add(task)
            return task

        return register(fn) if fn is not None else register

    # -- lifecycle -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the broker (done on first use; idempotent)."""
        if self._connected:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if not self._connected:
                await self.broker.connect()
                self._connected = True

    async def close(self) -> None:
        """Close the broker and the sync client, if any (idempotent)."""
        if self._sync is not None:
            sync, self._sync = self._sync, None
            await asyncio.to_thread(sync.close)
        if self._connected:
            self._connected = False
            await self.broker.close()

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

    @property
    def sync(self) -> SyncClient:
        """A client for sync code (scripts, Flask, Django) driving this app on a background loop."""
        if self._sync is None:
            from conveyor.sync import SyncClient

            self._sync = SyncClient(self)
        return self._sync

    # -- enqueue ---------------------------------------------------------------------------------

    def request(
        self,
        task: Task[Any, Any] | str,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        delay_s: float | None = None,
        priority: str | Priority | None = None,
        dedup_key: str | None = None,
        max_attempts: int | None = None,
        queue: str | None = None,
        timeout_s: float | None = None,
        job_id: str | None = None,
        pending: bool = False,
        retry: RetryPolicy | None = None,
        on_success: Task[..., Any] | str | None = None,
        on_failure: Task[..., Any] | str | None = None,
    ) -> JobRequest:
        """Build (and check) one job without enqueuing it; pass a list to :meth:`enqueue_many`.

        ``task`` may be a task name not registered here (a producer need not import the worker's
        code); a registered task's arguments are checked against its signature now.
        """
        kwargs = dict(kwargs or {})
        if isinstance(task, Task):
            registered: Task[Any, Any] | None = task
            name = task.name
        else:
            name = task
            registered = self.registry.find(name)
        options = registered.options if registered is not None else TaskOptions()
        if registered is not None:
            try:
                registered.check_arguments(args, kwargs)
            except TypeError as exc:
                raise InvalidJobError(f"arguments do not fit task {name!r}: {exc}") from None
        if delay_s is not None and delay_s < 0:
            raise InvalidJobError(f"delay_s must be >= 0, got {delay_s}")
        # A task this process does not know keeps its retry policy and timeout unset, so the
        # worker (which has the task) applies the task's declared ones.
        policy = retry or options.retry or (RetryPolicy() if registered is not None else None)
        attempts = (
            max_attempts
            if max_attempts is not None
            else (policy.max_attempts if policy is not None else DEFAULT_MAX_ATTEMPTS)
        )
        run_at_ms = 0
        if delay_s:
            run_at_ms = self.broker.clock.now_ms() + int(delay_s * 1000)
        queue_name = queue or (options.queue if registered is not None else self.default_queue)
        job = Job(
            id=job_id or new_job_id(),
            task=name,
            queue=queue_name,
            args=list(args),
            kwargs=kwargs,
            priority=Priority.parse(priority) if priority is not None else options.priority,
            state=JobState.PENDING if pending else JobState.QUEUED,
            max_attempts=attempts,
            max_lost_leases=options.max_lost_leases,
            run_at_ms=run_at_ms,
            dedup_key=dedup_key,
            timeout_s=timeout_s if timeout_s is not None else options.timeout_s,
            retry=policy.spec if policy is not None else None,
            on_success=callback_name(on_success) or options.on_success,
            on_failure=callback_name(on_failure) or options.on_failure,
        )
        return JobRequest(job)

    async def enqueue(
        self,
        task: Task[P, R] | str,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> JobHandle[R]:
        """Enqueue one job; returns its handle (whose id is the live job's if deduplicated)."""
        handles = await self.enqueue_many([self.request(task, args=args, kwargs=kwargs, **options)])
        return handles[0]

    async def enqueue_many(self, requests: Iterable[JobRequest]) -> list[JobHandle[Any]]:
        """Enqueue many jobs in one broker call: all are checked before any is written."""
        jobs = [r.job for r in requests]
        await self.connect()
        ids = await self.broker.enqueue(jobs)
        return [JobHandle(self, job_id) for job_id in ids]

    # -- inspect and control ---------------------------------------------------------------------

    def handle(self, job_id: str) -> JobHandle[Any]:
        """A handle on an existing job."""
        return JobHandle(self, job_id)

    async def get_job(self, job_id: str) -> Job | None:
        """The job record, or None."""
        await self.connect()
        return await self.broker.get(job_id)

    async def start(self, job_id: str) -> Job:
        """Start a pending job."""
        await self.connect()
        return await self.broker.start(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job (a running one is stopped by its worker within a second)."""
        await self.connect()
        return await self.broker.cancel(job_id)

    async def delete(self, job_id: str) -> None:
        """Delete a job and its logs."""
        await self.connect()
        await self.broker.delete(job_id)

    async def retry_job(self, job_id: str) -> int:
        """Re-drive one failed or stopped job; returns 1 if it was re-queued, else 0."""
        job = await self.get_job(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}; it may have been deleted or cleaned up")
        return await self.broker.redrive(job.queue, [job_id])

    async def logs(self, job_id: str, *, offset: int = 0, limit: int | None = None) -> LogPage:
        """A job's captured log lines."""
        await self.connect()
        return await self.broker.logs(job_id, offset=offset, limit=limit)

    async def list_jobs(self, **filters: Any) -> JobPage:
        """Jobs by queue, state and task (see :meth:`Broker.list_jobs`)."""
        await self.connect()
        return await self.broker.list_jobs(**filters)

    async def counts(self, queue: str | None = None) -> dict[str, dict[JobState, int]]:
        """Jobs per state, per queue."""
        await self.connect()
        return await self.broker.counts(queue)

    async def wait(self, job_id: str, *, timeout_s: float | None = None) -> Job:
        """Wait until the job is finished and return its record (JobTimeout after ``timeout_s``).

        Follows the broker's event stream, and re-reads the job at least every second, so a
        missed event only delays the answer.
        """
        await self.connect()
        changed = asyncio.Event()

        async def follow() -> None:
            async for _event in self.broker.subscribe(job_id=job_id):
                changed.set()

        follower = asyncio.create_task(follow(), name=f"conveyor-wait-{job_id}")
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    job = await self.broker.get(job_id)
                    if job is None:
                        raise JobNotFound(f"no job {job_id!r}; it may have been deleted")
                    if job.state.is_finished:
                        return job
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await changed.wait()
                    changed.clear()
        except TimeoutError:
            raise JobTimeout(f"job {job_id} did not finish within {timeout_s} s") from None
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower


class JobHandle(Generic[R]):
    """A reference to one job: ``await handle.result()``, ``.status()``, ``.cancel()``."""

    __slots__ = ("app", "id")

    def __init__(self, app: Conveyor, job_id: str) -> None:
        self.app = app
        self.id = job_id

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    async def status(self) -> Job:
        """The job's current record (raises JobNotFound if it is gone)."""
        job = await self.app.get_job(self.id)
        if job is None:
            raise JobNotFound(f"no job {self.id!r}; it may have been deleted or cleaned up")
        return job

    async def result(self, timeout_s: float | None = None) -> R:
        """Wait for the job and return its result; JobFailed if it failed or was stopped."""
        job = await self.app.wait(self.id, timeout_s=timeout_s)
        if job.state is JobState.COMPLETED:
            return job.result  # type: ignore[no-any-return]
        detail = f": {job.error}" if job.error else ""
        raise JobFailed(f"job {self.id} ended {job.state.value}{detail}")

    async def cancel(self) -> Job:
        """Cancel the job."""
        return await self.app.cancel(self.id)
