"""The one table of service operations: REST routes and JSON-RPC methods both call these.

Each :class:`Operation` names its JSON-RPC method (seed 004's ``queue_*`` names), its parameter
and result models (from :mod:`.schemas`) and one handler. The REST layer maps a route's path,
query and body onto the same parameter model; JSON-RPC maps ``params`` onto it. So validation,
behaviour, results and errors are the same on both faces, and neither adds logic of its own.

Every broker-touching call goes through :func:`invoke`: it fails fast while the broker is known to
be down (:class:`~.security.BrokerGuard`) and bounds the call by ``broker_timeout_s``, so an
unreachable broker costs a client at most that long and a 503, never a hung request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from conveyor.client import Conveyor, JobRequest
from conveyor.errors import BrokerUnavailable, ConveyorError, InvalidTransition, JobNotFound
from conveyor.job import JobState
from conveyor.service import schemas as s
from conveyor.service.health import HttpStats, build_health
from conveyor.service.security import BrokerGuard

if TYPE_CHECKING:
    from conveyor.service.events import EventHub


class WorkerLike(Protocol):
    """What the service needs of an in-process worker (:class:`conveyor.worker.worker.Worker`)."""

    async def start(self) -> None:
        """Start consuming; returns once ready."""
        ...

    def stop(self) -> Awaitable[Any]:
        """Stop gracefully (idempotent, bounded); await the result."""
        ...

    def health(self) -> dict[str, Any]:
        """Liveness, consumption and circuit state, as plain JSON values."""
        ...


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and timeouts of the HTTP service (defaults suit one server on one machine).

    Attributes:
        token: bearer token required on every route but ``/health`` (None: no auth, loopback).
        max_body_bytes: request body cap (None: the codec's payload cap + 64 KiB).
        rpc_batch_cap: most calls in one JSON-RPC batch.
        rate_limit_per_s: sustained requests per second per client address (None: no limit).
        rate_burst: requests a client may make at once before the rate applies.
        broker_timeout_s: longest wait for the broker before answering 503.
        breaker_cooldown_s: after the broker was unreachable, answer 503 at once for this long.
        health_timeout_s: longest wait for the broker's ping in ``/health``.
        event_history: events kept in memory for fan-out and resume (the shared ring).
        event_max_lag: events a stream client may stay behind ...
        event_lag_grace_s: ... for longer than this before it is dropped as too slow.
        event_send_timeout_s: a client whose socket takes a write for longer is dropped.
        event_heartbeat_s: keep-alive interval on idle streams.
        max_event_clients: concurrent stream clients (more get 503 / close 1013).
        max_direct_clients: clients replaying from the broker (cursor older than the ring).
        worker_grace_s: how long shutdown waits for in-process workers to stop.
        max_in_flight: HTTP requests handled at once; more get 503 + Retry-After at once
            (None: no bound; see :mod:`conveyor.service.admission`).
    """

    token: str | None = None
    max_body_bytes: int | None = None
    rpc_batch_cap: int = 100
    rate_limit_per_s: float | None = 100.0
    rate_burst: int = 200
    broker_timeout_s: float = 2.0
    breaker_cooldown_s: float = 1.0
    health_timeout_s: float = 1.0
    event_history: int = 10_000
    event_max_lag: int = 1_000
    event_lag_grace_s: float = 2.0
    event_send_timeout_s: float = 10.0
    event_heartbeat_s: float = 15.0
    max_event_clients: int = 1_000
    max_direct_clients: int = 16
    worker_grace_s: float = 30.0
    max_in_flight: int | None = 128


class EnqueueBatcher:
    """Group commit for enqueues: concurrent requests share broker calls.

    Requests that arrive while broker calls are in flight go out together in the next one. An
    enqueue costs the broker one or two round trips whatever its size (a script per queue on
    Redis, one transaction on SQLite), so under load this multiplies throughput; at low load a
    request goes out at once, alone (up to ``concurrency`` calls run in parallel before anything
    waits). A combined call is all or nothing like every enqueue; when the broker refuses one,
    each request's jobs are tried again on their own, so a bad job fails only its own request
    and the results are those of sequential enqueues.

    Args:
        app: the app whose broker stores the jobs.
        timeout_s: bound on each broker call.
        max_jobs: most jobs per combined call.
        concurrency: broker calls in flight at once.
    """

    def __init__(
        self, app: Conveyor, *, timeout_s: float, max_jobs: int = 1000, concurrency: int = 4
    ) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.max_jobs = max_jobs
        self._idle = concurrency
        self._pending: deque[_Submission] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(self, requests: list[JobRequest]) -> list[str]:
        """Enqueue ``requests`` (all or nothing); their ids in order."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append((requests, future))
        if self._idle:
            self._idle -= 1
            # Broker calls run in tasks of their own: a request that is cancelled (its client
            # went away, or it timed out) must not cancel a call that carries others' jobs.
            task = asyncio.create_task(self._drain(), name="conveyor-enqueue")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def close(self, timeout_s: float) -> None:
        """Wait (bounded) for the calls in flight; cancel them after ``timeout_s``."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._flush(self._take())
        finally:
            self._idle += 1

    def _take(self) -> list[_Submission]:
        batch: list[_Submission] = []
        jobs = 0
        while self._pending and jobs < self.max_jobs:
            submission = self._pending.popleft()
            if not submission[1].done():  # a cancelled request's jobs are not sent at all
                batch.append(submission)
                jobs += len(submission[0])
        return batch

    async def _flush(self, batch: list[_Submission]) -> None:
        if not batch:
            return
        requests = [request for submission in batch for request in submission[0]]
        try:
            async with asyncio.timeout(self.timeout_s):
                handles = await self.app.enqueue_many(requests)
        except TimeoutError:
            exc: BaseException = BrokerUnavailable(
                f"the broker did not answer within {self.timeout_s:g} s; the jobs may or may "
                "not have been stored: check before retrying (a dedup_key makes it safe)"
            )
        except ConveyorError as refused:
            if len(batch) > 1 and not isinstance(refused, BrokerUnavailable):
                for submission in batch:  # find the request at fault; the others go through
                    await self._flush([submission])
                return
            exc = refused
        except Exception as failed:
            exc = failed
        else:
            start = 0
            for submitted, future in batch:
                if not future.done():
                    future.set_result([h.id for h in handles[start : start + len(submitted)]])
                start += len(submitted)
            return
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)


_Submission = tuple[list[JobRequest], "asyncio.Future[list[str]]"]


@dataclass
class Service:
    """What every operation runs against: the app, its workers, the event hub and the guards."""

    app: Conveyor
    settings: ServiceSettings
    hub: EventHub
    enqueuer: EnqueueBatcher
    workers: list[WorkerLike] = field(default_factory=list)
    guard: BrokerGuard = field(default_factory=BrokerGuard)
    http: HttpStats = field(default_factory=HttpStats)
    started_at: float = field(default_factory=time.monotonic)
    loop_lag_s: float = 0.0


Handler = Callable[[Service, Any], Awaitable[s.Result]]


@dataclass(frozen=True)
class Operation:
    """One operation: its JSON-RPC method name, parameter and result models, and handler."""

    method: str
    params: type[s.Params]
    result: type[s.Result]
    handler: Handler
    summary: str
    uses_broker: bool = True


async def invoke(service: Service, op: Operation, params: s.Params) -> s.Result:
    """Run ``op``: fail fast while the broker is down, bound the call, track the breaker."""
    if not op.uses_broker:
        return await op.handler(service, params)
    guard = service.guard
    guard.check()
    timeout_s = service.settings.broker_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            result = await op.handler(service, params)
    except TimeoutError:
        exc = BrokerUnavailable(
            f"the broker did not answer within {timeout_s:g} s; the request may or may not have "
            "taken effect: read the job before retrying (a dedup_key makes enqueue retries safe)"
        )
        guard.failure(exc)
        raise exc from None
    except BrokerUnavailable as exc:
        guard.failure(exc)
        raise
    guard.success()
    return result


# -- handlers --------------------------------------------------------------------------------------


async def _enqueue(service: Service, specs: list[s.JobSpec]) -> list[str]:
    app = service.app
    requests = [
        app.request(
            spec.task,
            args=spec.args,
            kwargs=spec.kwargs,
            queue=spec.queue,
            priority=spec.priority,
            delay_s=spec.delay_s,
            dedup_key=spec.dedup_key,
            max_attempts=spec.max_attempts,
            timeout_s=spec.timeout_s,
            job_id=spec.job_id,
            pending=not spec.start,
        )
        for spec in specs
    ]
    return await service.enqueuer.enqueue(requests)


async def add_job(service: Service, params: s.JobSpec) -> s.Enqueued:
    """Enqueue one job."""
    [job_id] = await _enqueue(service, [params])
    return s.Enqueued(job_id=job_id)


async def add_jobs(service: Service, params: s.JobBatch) -> s.EnqueuedBatch:
    """Enqueue a batch, all or nothing."""
    return s.EnqueuedBatch(job_ids=await _enqueue(service, params.jobs))


def _missing(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r}; it may have been deleted or cleaned up after retention")


async def get_job(service: Service, params: s.JobRef) -> s.JobOut:
    """One job's record."""
    job = await service.app.get_job(params.job_id)
    if job is None:
        raise _missing(params.job_id)
    return s.JobOut.of(job)


async def start_job(service: Service, params: s.JobRef) -> s.JobOut:
    """Start a pending (held) job: it becomes queued."""
    return s.JobOut.of(await service.app.start(params.job_id))


async def stop_job(service: Service, params: s.JobRef) -> s.JobOut:
    """Cancel a job (a running one is stopped by its worker)."""
    return s.JobOut.of(await service.app.cancel(params.job_id))


async def retry_job(service: Service, params: s.JobRef) -> s.JobOut:
    """Re-drive one failed or stopped job."""
    app = service.app
    redriven = await app.retry_job(params.job_id)
    job = await app.get_job(params.job_id)
    if job is None:
        raise _missing(params.job_id)
    if not redriven:
        raise InvalidTransition(
            f"job {params.job_id!r} is {job.state}; only failed or stopped jobs can be retried"
        )
    return s.JobOut.of(job)


async def delete_job(service: Service, params: s.JobRef) -> s.Deleted:
    """Delete a job and its logs."""
    await service.app.delete(params.job_id)
    return s.Deleted(job_id=params.job_id)


async def job_logs(service: Service, params: s.LogsParams) -> s.LogsOut:
    """A job's kept log lines."""
    page = await service.app.logs(params.job_id, offset=params.offset, limit=params.limit)
    return s.LogsOut(
        job_id=params.job_id,
        lines=page.lines,
        offset=params.offset,
        total=page.total,
        dropped=page.dropped,
    )


async def list_jobs(service: Service, params: s.ListQuery) -> s.JobPageOut:
    """Jobs by queue, state and task, newest first."""
    page = await service.app.list_jobs(
        queue=params.queue,
        states=params.state,
        task=params.task,
        limit=params.limit,
        cursor=params.cursor,
    )
    return s.JobPageOut(jobs=[s.JobOut.of(j) for j in page.jobs], next_cursor=page.next_cursor)


async def list_dead_letters(service: Service, params: s.DeadLetterQuery) -> s.JobPageOut:
    """Failed jobs (the dead letters), newest first."""
    query = s.ListQuery(state=[JobState.FAILED], **params.model_dump())
    return await list_jobs(service, query)


async def counts(service: Service, params: s.CountsQuery) -> s.CountsOut:
    """Jobs per state, per queue."""
    per_queue = await service.app.counts(params.queue)
    totals = dict.fromkeys(JobState, 0)
    for row in per_queue.values():
        for state, n in row.items():
            totals[state] += n
    return s.CountsOut(queues=per_queue, totals=totals)


async def purge(service: Service, params: s.PurgeParams) -> s.Purged:
    """Delete a queue's jobs in the given states (default: not yet started)."""
    app = service.app
    await app.connect()
    deleted = await app.broker.purge(params.queue, params.state)
    return s.Purged(queue=params.queue, deleted=deleted)


async def redrive(service: Service, params: s.RedriveParams) -> s.Redriven:
    """Dead letters back to work: all of a queue (or of every queue), or the listed ids."""
    app = service.app
    await app.connect()
    targets: list[tuple[str, list[str] | None]]
    if params.job_ids is None:
        queues = [params.queue] if params.queue else await app.broker.queues()
        targets = [(queue, None) for queue in queues]
    elif params.queue is not None:
        targets = [(params.queue, params.job_ids)]
    else:
        grouped: dict[str, list[str]] = {}
        for job_id in params.job_ids:
            job = await app.get_job(job_id)
            if job is not None:  # like the broker, ids that are not dead letters are skipped
                grouped.setdefault(job.queue, []).append(job_id)
        targets = list(grouped.items())
    total = 0
    for queue, ids in targets:
        total += await app.broker.redrive(queue, ids)
    return s.Redriven(redriven=total, queues=sorted(queue for queue, _ in targets))


async def health(service: Service, params: s.HealthQuery) -> s.HealthOut:
    """Broker, workers, event stream and loop lag (never raises for an unreachable broker)."""
    return await build_health(service, include_counts=params.counts)


def _op(
    method: str,
    params: type[s.Params],
    result: type[s.Result],
    handler: Callable[[Service, Any], Awaitable[Any]],
    *,
    uses_broker: bool = True,
) -> Operation:
    summary = (handler.__doc__ or method).strip().splitlines()[0]
    return Operation(method, params, result, handler, summary, uses_broker)


#: Every operation, by JSON-RPC method name (seed 004's names first, then the rest of REST).
#: ``queue_add_job`` validates with :class:`~.schemas.HeldJobSpec` (held unless ``start``);
#: REST's ``POST /jobs`` calls the same operation with a :class:`~.schemas.JobSpec`.
OPERATIONS: Final[dict[str, Operation]] = {
    op.method: op
    for op in (
        _op("queue_add_job", s.HeldJobSpec, s.Enqueued, add_job),
        _op("queue_start_job", s.JobRef, s.JobOut, start_job),
        _op("queue_stop_job", s.JobRef, s.JobOut, stop_job),
        _op("queue_delete_job", s.JobRef, s.Deleted, delete_job),
        _op("queue_get_job_status", s.JobRef, s.JobOut, get_job),
        _op("queue_get_job_logs", s.LogsParams, s.LogsOut, job_logs),
        _op("queue_list_jobs", s.ListQuery, s.JobPageOut, list_jobs),
        _op("queue_health", s.HealthQuery, s.HealthOut, health, uses_broker=False),
        _op("queue_add_jobs", s.JobBatch, s.EnqueuedBatch, add_jobs),
        _op("queue_retry_job", s.JobRef, s.JobOut, retry_job),
        _op("queue_counts", s.CountsQuery, s.CountsOut, counts),
        _op("queue_purge", s.PurgeParams, s.Purged, purge),
        _op("queue_list_dead_letters", s.DeadLetterQuery, s.JobPageOut, list_dead_letters),
        _op("queue_redrive", s.RedriveParams, s.Redriven, redrive),
    )
}
