"""Seed 002's ``QueueManager``: enqueue operations, read queue status and purge, through conveyor.

Every call is one conveyor client call (or a few reads, for the status): the seed's per-priority
Redis lists become one conveyor queue whose jobs carry their priority, and its failure queues
become the broker's dead letters. The public methods are synchronous, as the seed's are (its
example enqueues before any event loop runs); they go through the app's sync client. Async code
on the worker's loop should await the ``a``-prefixed twins instead, which never block the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from conveyor.brokers.base import PURGEABLE_STATES
from conveyor.client import Conveyor, JobRequest
from conveyor.compat.seed002_config import QueueConfig
from conveyor.compat.seed002_retry import QueueRetryConfig
from conveyor.errors import (
    BrokerUnavailable,
    ConfigurationError,
    JobNotFound,
    UnencodablePayloadError,
)
from conveyor.job import FailureReason, Job, JobState, Priority, new_job_id, validate_queue_name

T = TypeVar("T")

#: Jobs read per page when counting by priority or failure reason.
PAGE_SIZE: Final = 1000
#: What a queue's report key counts: jobs not yet running (what purge_queue removes).
WAITING_STATES: Final = PURGEABLE_STATES

_BATCH_REFUSED: Final = ("operation_id", "deduplication_key")


class QueueManager:
    """Enqueues operations for a :class:`QueueWorker` and reports on the queues (seed 002's API).

    Args:
        config: the shared configuration (its app, queues and metrics).
    """

    def __init__(self, config: QueueConfig) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"<QueueManager {self.config!r}>"

    # -- enqueue ---------------------------------------------------------------------------------

    def enqueue(
        self,
        entity: Any,
        processor: Callable[..., Any] | str,
        queue_name: str | None = None,
        priority: str = "normal",
        operation_id: str | None = None,
        retry_config: QueueRetryConfig | None = None,
        on_success: Callable[..., Any] | str | None = None,
        on_failure: Callable[..., Any] | str | None = None,
        timeout: float | None = None,
        deduplication_key: str | None = None,
        custom_serializer: Callable[[Any], Any] | None = None,
    ) -> dict[str, Any]:
        """Enqueue one operation: ``processor(entity)`` runs on a worker.

        Args:
            entity: the processor's single argument (JSON-compatible, or made so by
                ``custom_serializer``).
            processor: a function (registered here as a task on first use) or the name of a
                registered one. An unregistered name is refused with UnknownTask.
            queue_name: the conveyor queue (default: the config's default queue).
            priority: ``high``, ``normal`` or ``low``.
            operation_id: the job id to use (default: a new random id).
            retry_config: retries after a failure (default: ``QueueRetryConfig()``).
            on_success: a callback (function or registered name) called with the seed's data
                dict once the operation completed.
            on_failure: likewise, once the operation finally failed (no retry left).
            timeout: seconds one run may take, async or sync (default:
                :meth:`QueueConfig.timeout_for`, 30 s unless configured).
            deduplication_key: while a job with this key is waiting or running in the queue,
                enqueueing another returns that job's id with status ``duplicate``.
            custom_serializer: ``default=`` function for ``json.dumps``: the entity is stored
                (and given to the processor) in its JSON form.

        Returns:
            ``{"operation_id", "status": "queued" | "duplicate", "queue", "priority",
            "queue_key", "processor"}``.
        """
        request = self._request(
            entity,
            processor,
            queue_name=queue_name,
            priority=priority,
            operation_id=operation_id,
            retry_config=retry_config,
            on_success=on_success,
            on_failure=on_failure,
            timeout=timeout,
            deduplication_key=deduplication_key,
            custom_serializer=custom_serializer,
        )
        return self._portal(lambda app: self._submit(app, [request]))[0]

    def enqueue_batch(
        self, entities: Sequence[Any], processor: Callable[..., Any] | str, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """Enqueue one operation per entity in a single broker call (all or nothing).

        ``kwargs`` are :meth:`enqueue`'s (``priority``, ``retry_config``, ``on_success`` ...),
        shared by every entity; ``operation_id`` and ``deduplication_key`` are refused, as one
        value cannot name several operations. Returns one result dict per entity, in order.
        """
        requests = self._batch_requests(entities, processor, kwargs)
        if not requests:
            return []
        return self._portal(lambda app: self._submit(app, requests))

    async def aenqueue(
        self, entity: Any, processor: Callable[..., Any] | str, **kwargs: Any
    ) -> dict[str, Any]:
        """:meth:`enqueue` for async code on the app's loop (does not block it)."""
        request = self._request(entity, processor, **kwargs)
        return (await self._submit(self.config.app, [request]))[0]

    async def aenqueue_batch(
        self, entities: Sequence[Any], processor: Callable[..., Any] | str, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """:meth:`enqueue_batch` for async code on the app's loop."""
        requests = self._batch_requests(entities, processor, kwargs)
        return await self._submit(self.config.app, requests) if requests else []

    def _batch_requests(
        self, entities: Sequence[Any], processor: Callable[..., Any] | str, kwargs: dict[str, Any]
    ) -> list[JobRequest]:
        refused = [k for k in _BATCH_REFUSED if kwargs.get(k) is not None]
        if refused:
            raise ConfigurationError(
                f"enqueue_batch cannot share {', '.join(refused)} between entities; "
                "enqueue those operations one by one"
            )
        return [self._request(entity, processor, **kwargs) for entity in entities]

    def _request(
        self,
        entity: Any,
        processor: Callable[..., Any] | str,
        *,
        queue_name: str | None = None,
        priority: str = "normal",
        operation_id: str | None = None,
        retry_config: QueueRetryConfig | None = None,
        on_success: Callable[..., Any] | str | None = None,
        on_failure: Callable[..., Any] | str | None = None,
        timeout: float | None = None,
        deduplication_key: str | None = None,
        custom_serializer: Callable[[Any], Any] | None = None,
    ) -> JobRequest:
        """Build and check one job (nothing is written); every mistake is raised here."""
        config = self.config
        task = config.resolve(processor)
        queue = config.track_queue(validate_queue_name(queue_name or config.default_queue))
        if custom_serializer is not None:
            entity = json.loads(self._serialize_entity(entity, custom_serializer))
        retry = retry_config or QueueRetryConfig()
        return config.app.request(
            task,
            args=[entity],
            queue=queue,
            priority=Priority.parse(priority),
            job_id=operation_id or self._generate_operation_id(),
            retry=retry.to_policy(),
            max_attempts=retry.max_attempts + 1,
            on_success=config.resolve(on_success, callback=True) if on_success else None,
            on_failure=config.resolve(on_failure, callback=True) if on_failure else None,
            timeout_s=config.timeout_for(timeout),
            dedup_key=deduplication_key,
        )

    async def _submit(self, app: Conveyor, requests: list[JobRequest]) -> list[dict[str, Any]]:
        """Enqueue ``requests`` in one broker call and describe each outcome."""
        handles = await app.enqueue_many(requests)
        results = []
        for request, handle in zip(requests, handles, strict=True):
            job = request.job
            results.append(
                {
                    "operation_id": handle.id,
                    "status": "queued" if handle.id == job.id else "duplicate",
                    "queue": job.queue,
                    "priority": job.priority.value,
                    "queue_key": self.config.get_queue_key(job.queue, job.priority.value),
                    "processor": job.task,
                }
            )
        queued = sum(r["status"] == "queued" for r in results)
        if queued:
            self.config.update_metric("enqueued", queued)
        if len(results) - queued:
            self.config.update_metric("duplicates", len(results) - queued)
        return results

    # -- status and purge ------------------------------------------------------------------------

    def get_queue_status(self) -> dict[str, Any]:
        """Counts per queue and priority, dead letters, and metrics, in the seed's shape.

        ``{prefix}{priority}:{queue}`` (every priority of every queue this config uses, plus
        any queue with waiting jobs): jobs waiting to run (queued, scheduled for a retry or a
        delay, or held). ``{prefix}failures``: dead letters; ``{prefix}system_errors``: dead
        letters that could not even start (unknown processor, undecodable payload, bad
        arguments) - the two are disjoint. ``total_items`` adds them all up; ``metrics`` is
        :meth:`QueueConfig.get_metrics`; ``status_time`` is epoch seconds.
        """
        return self._portal(self._status, retry=True)

    async def aget_queue_status(self) -> dict[str, Any]:
        """:meth:`get_queue_status` for async code on the app's loop."""
        return await self._retrying(lambda: self._status(self.config.app))

    def purge_queue(self, queue_name: str, priority: str | None = "normal") -> int:
        """Remove the waiting operations of one queue at one priority; returns how many.

        Running operations are never removed. ``priority=None`` purges every priority in one
        atomic broker call; with a priority, the waiting jobs of that priority are listed and
        deleted one by one, so a job a worker reserves in between may be caught running and
        stopped (see docs/seed002.md).
        """
        return self._portal(lambda app: self._purge(app, queue_name, priority), retry=True)

    async def apurge_queue(self, queue_name: str, priority: str | None = "normal") -> int:
        """:meth:`purge_queue` for async code on the app's loop."""
        return await self._retrying(lambda: self._purge(self.config.app, queue_name, priority))

    async def _status(self, app: Conveyor) -> dict[str, Any]:
        counts = await app.counts()
        status: dict[str, Any] = {}
        busy = {q for q, c in counts.items() if sum(c[s] for s in WAITING_STATES)}
        for queue in sorted(self.config.queues | busy):
            by_priority = dict.fromkeys(Priority, 0)
            if queue in busy:
                async for job in iter_jobs(app, queue=queue, states=WAITING_STATES):
                    by_priority[job.priority] += 1
            for priority, n in by_priority.items():
                status[self.config.get_queue_key(queue, priority.value)] = n
        failures = system_errors = 0
        for queue, c in counts.items():
            if c[JobState.FAILED]:
                async for job in iter_jobs(app, queue=queue, states=(JobState.FAILED,)):
                    if job.failure_reason == FailureReason.SYSTEM_ERROR:
                        system_errors += 1
                    else:
                        failures += 1
        total = sum(status.values()) + failures + system_errors
        status[self.config.failures_key] = failures
        status[self.config.system_errors_key] = system_errors
        status["total_items"] = total
        status["metrics"] = self.config.get_metrics()
        status["status_time"] = app.broker.clock.now_ms() / 1000.0
        return status

    async def _purge(self, app: Conveyor, queue_name: str, priority: str | None) -> int:
        validate_queue_name(queue_name)
        if priority is None:
            await app.connect()
            removed = await app.broker.purge(queue_name)
        else:
            wanted = Priority.parse(priority)
            # Ids first, deletes after: deleting while paging would shift the cursor.
            ids = [
                job.id
                async for job in iter_jobs(app, queue=queue_name, states=WAITING_STATES)
                if job.priority is wanted
            ]
            removed = 0
            for job_id in ids:
                try:
                    await app.delete(job_id)
                except JobNotFound:  # taken and finished (or purged) meanwhile
                    continue
                removed += 1
        self.config.logger.info(
            "purged %d jobs from %s",
            removed,
            self.config.get_queue_key(queue_name, priority or "*"),
            extra={"action": "purge", "queue": queue_name},
        )
        return removed

    # -- helpers (the seed's private API, kept for code that used it) ----------------------------

    def _generate_operation_id(self) -> str:
        """A new random operation id (a conveyor job id)."""
        return new_job_id()

    def _hash_entity(self, entity: Any) -> str:
        """A stable SHA-256 of the entity's canonical JSON; usable as a ``deduplication_key``."""
        canonical = json.dumps(entity, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _serialize_entity(
        self, entity: Any, default_serializer: Callable[[Any], Any] | None = None
    ) -> str:
        """The entity as JSON text; ``default_serializer`` converts values JSON cannot hold."""
        try:
            return json.dumps(entity, default=default_serializer)
        except (TypeError, ValueError) as exc:
            raise UnencodablePayloadError(
                f"cannot serialize the entity: {exc}; pass JSON-compatible values or a "
                "custom_serializer that converts the others"
            ) from None

    def _portal(self, op: Callable[[Conveyor], Awaitable[T]], *, retry: bool = False) -> T:
        """Run ``op`` on the sync client's loop, with the app it drives there, and wait for it.

        One async implementation serves both faces: the sync methods run it here, the async
        twins on ``config.app``.
        """

        async def call(app: Conveyor) -> T:
            return await (self._retrying(lambda: op(app)) if retry else op(app))

        return self.config.sync.call(call)

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent read or purge, retrying BrokerUnavailable with a doubling pause.

        At most ``max_connection_retries`` retries. Enqueue is never retried blindly: a call
        that failed may still have landed.
        """
        pause = 0.2
        for attempt in range(self.config.max_connection_retries + 1):
            try:
                return await op()
            except BrokerUnavailable:
                if attempt == self.config.max_connection_retries:
                    raise
                self.config.logger.warning(
                    "broker unavailable; retrying in %.1f s", pause, extra={"action": "reconnect"}
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)
        raise AssertionError("unreachable")  # pragma: no cover


async def iter_jobs(app: Conveyor, *, queue: str, states: Iterable[JobState]) -> AsyncIterator[Job]:
    """Every job of ``queue`` in ``states``, a page at a time."""
    wanted = list(states)
    cursor: str | None = None
    while True:
        page = await app.list_jobs(queue=queue, states=wanted, limit=PAGE_SIZE, cursor=cursor)
        for job in page.jobs:
            yield job
        if page.next_cursor is None:
            return
        cursor = page.next_cursor
