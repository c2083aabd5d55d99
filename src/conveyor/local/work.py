"""WorkQueue: seed 003's high-level face of BoundedQueue, with worker defaults and batches."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Self, TypeVar

from conveyor.local.bounded import BoundedQueue, ErrorHandler, QueueStatus, WorkerFunc

if TYPE_CHECKING:
    from conveyor.local.config import QueueConfig

__all__ = ["BatchOutcome", "WorkQueue"]

T = TypeVar("T")

# Counters a batch adds to its WorkQueue's metrics (size, in_flight and high_water_mark are not
# sums).
_SUMMED = (
    "enqueued",
    "processed",
    "errors",
    "error_handler_errors",
    "backpressure_events",
    "dropped",
    "discarded",
    "cancelled",
)


@dataclass(frozen=True, slots=True)
class BatchOutcome(Generic[T]):
    """What happened to one item of a :meth:`WorkQueue.batch_process` call."""

    item: T
    """The item, as given."""
    ok: bool
    """Whether the worker function returned (True) or raised (False)."""
    result: object = None
    """What the worker function returned, if it returned."""
    error: Exception | None = None
    """What the worker function raised, if it raised."""


class WorkQueue(Generic[T]):
    """A :class:`BoundedQueue` (block policy) with a worker count default and batch processing.

    Args:
        maxsize: Maximum number of queued items (at least 1).
        timeout: Default wait of ``put``, in seconds.
        concurrency_limit: Maximum number of workers, and the default for ``process``.
        logger: Logger for worker errors and shutdown.
        grace_period_s: Default ``stop()`` timeout, in seconds.

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(
        self,
        maxsize: int = 100,
        timeout: float = 0.1,
        concurrency_limit: int | None = None,
        logger: logging.Logger | None = None,
        *,
        grace_period_s: float = 5.0,
    ) -> None:
        if concurrency_limit is not None and concurrency_limit < 1:
            raise ValueError(f"concurrency_limit must be at least 1, got {concurrency_limit}")
        self._queue: BoundedQueue[T] = BoundedQueue(
            maxsize, timeout, logger, grace_period_s=grace_period_s
        )
        self._concurrency_limit = concurrency_limit
        self._logger = logger
        self._batch_totals = dict.fromkeys(_SUMMED, 0)
        self._batch_high_water = 0

    @classmethod
    def from_config(
        cls,
        config: QueueConfig,
        *,
        timeout: float = 0.1,
        logger: logging.Logger | None = None,
        grace_period_s: float = 5.0,
    ) -> Self:
        """A work queue sized by a :class:`~conveyor.local.QueueConfig`."""
        return cls(
            maxsize=config.queue_capacity,
            timeout=timeout,
            concurrency_limit=config.concurrency_limit,
            logger=logger,
            grace_period_s=grace_period_s,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._queue!r}>"

    @property
    def queue(self) -> BoundedQueue[T]:
        """The underlying bounded queue."""
        return self._queue

    @property
    def concurrency_limit(self) -> int | None:
        """The maximum number of workers, if limited."""
        return self._concurrency_limit

    @property
    def status(self) -> QueueStatus:
        """The current lifecycle state."""
        return self._queue.status

    @property
    def size(self) -> int:
        """The number of queued items."""
        return self._queue.size

    @property
    def is_full(self) -> bool:
        """Whether the queue holds ``maxsize`` items."""
        return self._queue.is_full

    @property
    def is_empty(self) -> bool:
        """Whether no item is queued."""
        return self._queue.is_empty

    @property
    def metrics(self) -> dict[str, int]:
        """The queue's metrics, with the counts of every ``batch_process`` call added in."""
        metrics = self._queue.metrics
        for key, value in self._batch_totals.items():
            metrics[key] += value
        metrics["high_water_mark"] = max(metrics["high_water_mark"], self._batch_high_water)
        return metrics

    async def start(self) -> None:
        """Open the queue (see :meth:`BoundedQueue.start`)."""
        await self._queue.start()

    async def stop(self, timeout: float | None = None, *, drain: bool = True) -> int:  # noqa: ASYNC109
        """Stop the queue and its workers; see :meth:`BoundedQueue.stop`."""
        return await self._queue.stop(timeout, drain=drain)

    async def put(self, item: T, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Add an item; False if the queue stayed full (see :meth:`BoundedQueue.put`)."""
        return await self._queue.put(item, timeout)

    async def join(self) -> None:
        """Wait until every queued item has been processed (see :meth:`BoundedQueue.join`)."""
        await self._queue.join()

    async def process(
        self,
        worker_func: WorkerFunc[T],
        num_workers: int | None = None,
        error_handler: ErrorHandler[T] | None = None,
    ) -> None:
        """Start workers that process queued items with ``worker_func``.

        Args:
            worker_func: Async function that processes one item.
            num_workers: Number of workers (default: ``concurrency_limit``, or 1).
            error_handler: Optional async function called with ``(exc, item)`` on failure.

        Raises:
            QueueStateError: The queue is not PROCESSING, or its workers are already running.
            ValueError: ``num_workers`` is below 1 or above ``concurrency_limit``.
        """
        await self._queue.start_workers(worker_func, self._worker_count(num_workers), error_handler)

    async def batch_process(
        self,
        items: Iterable[T],
        worker_func: WorkerFunc[T],
        num_workers: int | None = None,
        error_handler: ErrorHandler[T] | None = None,
    ) -> list[BatchOutcome[T]]:
        """Process every item with ``worker_func`` and return the outcomes, in input order.

        The batch runs on a queue of its own with this queue's settings: it is started, fed
        with backpressure (waiting for room, never dropping), joined and stopped. Items ``put``
        on this queue meanwhile are not mixed in, and the batch's counts are added to
        :attr:`metrics`. A worker function that raises gives a failed outcome and goes to
        ``error_handler``; the other items carry on. If this call is cancelled, the batch stops
        without draining.

        Args:
            items: The items to process.
            worker_func: Async function that processes one item.
            num_workers: Number of workers (default: ``concurrency_limit``, or 1).
            error_handler: Optional async function called with ``(exc, item)`` on failure.

        Returns:
            One :class:`BatchOutcome` per item, in the order of ``items``.
        """
        workers = self._worker_count(num_workers)
        batch = list(items)
        outcomes: list[BatchOutcome[T] | None] = [None] * len(batch)

        async def run(entry: tuple[int, T]) -> None:
            index, item = entry
            try:
                result = await worker_func(item)
            except Exception as exc:
                outcomes[index] = BatchOutcome(item, ok=False, error=exc)
                raise  # the queue counts the error and calls error_handler
            outcomes[index] = BatchOutcome(item, ok=True, result=result)

        on_error: ErrorHandler[tuple[int, T]] | None = None
        if error_handler is not None:
            user_handler = error_handler

            async def on_error(exc: Exception, entry: tuple[int, T]) -> None:
                await user_handler(exc, entry[1])

        queue: BoundedQueue[tuple[int, T]] = BoundedQueue(
            self._queue.maxsize,
            self._queue.timeout,
            self._logger,
            grace_period_s=self._queue.grace_period_s,
        )
        try:
            async with queue:
                await queue.start_workers(run, workers, on_error)
                for entry in enumerate(batch):
                    # Wait for room however long it takes: the batch is only done when every
                    # item went through. stop() (on cancellation) still releases this wait.
                    await queue.put(entry, timeout=math.inf)
                await queue.join()
        finally:
            self._add_batch_metrics(queue.metrics)
        done = [outcome for outcome in outcomes if outcome is not None]
        # join() returned, so every item has an outcome.
        assert len(done) == len(batch)
        return done

    def _add_batch_metrics(self, metrics: dict[str, int]) -> None:
        for key in _SUMMED:
            self._batch_totals[key] += metrics[key]
        self._batch_high_water = max(self._batch_high_water, metrics["high_water_mark"])

    def _worker_count(self, num_workers: int | None) -> int:
        limit = self._concurrency_limit
        if num_workers is None:
            return limit or 1
        if limit is not None and num_workers > limit:
            raise ValueError(f"num_workers={num_workers} is above concurrency_limit={limit}")
        return num_workers

    async def __aenter__(self) -> Self:
        """Start the queue."""
        await self._queue.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the queue (see :meth:`BoundedQueue.__aexit__`)."""
        await self._queue.__aexit__(exc_type, exc, tb)
