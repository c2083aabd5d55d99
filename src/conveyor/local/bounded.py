"""BoundedQueue: an in-process work queue with backpressure, overflow policies, a bounded stop."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import reprlib
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

from conveyor.local.errors import QueueEmptyError, QueueFullError, QueueStateError

__all__ = ["BoundedQueue", "ErrorHandler", "OverflowPolicy", "QueueStatus", "WorkerFunc"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

WorkerFunc = Callable[[T], Awaitable[object]]
"""An async function that processes one item."""

ErrorHandler = Callable[[Exception, T], Awaitable[object]]
"""An async function called with ``(exc, item)`` when a worker function raises."""

# How long stop() waits for cancelled workers to unwind once the grace period is over. A handler
# that swallows CancelledError must not turn stop() into a hang, so this wait is bounded too.
_CANCEL_GRACE_S = 0.05


class QueueStatus(enum.StrEnum):
    """The lifecycle states of a queue.

    ``IDLE`` --start()--> ``PROCESSING`` --stop()--> ``STOPPING`` --> ``STOPPED`` --start()--> ...
    """

    IDLE = "idle"
    PROCESSING = "processing"
    STOPPING = "stopping"
    STOPPED = "stopped"


class OverflowPolicy(enum.StrEnum):
    """What ``put`` does with an item when the queue is full. None of them waits without a bound."""

    BLOCK = "block"
    """Wait up to the timeout for room, then report backpressure (``put`` returns False)."""
    REJECT = "reject"
    """Raise :class:`QueueFullError` at once."""
    DROP_OLDEST = "drop_oldest"
    """Make room by dropping the oldest queued item; the new item is queued."""
    DROP_NEWEST = "drop_newest"
    """Drop the new item itself; the queued items stay as they are."""


class BoundedQueue(Generic[T]):
    """A bounded asyncio queue with worker tasks, backpressure and a stop that never hangs.

    Lifecycle: ``start()`` (or ``async with``) opens the queue, ``start_workers()`` runs worker
    tasks that call ``worker_func(item)`` for each item, ``stop()`` closes it within its timeout.

    Metrics (see :attr:`metrics`) always add up::

        enqueued == processed + dropped + discarded + cancelled + size + in_flight

    ``enqueued`` counts every item ``put`` accepted; under a drop policy an accepted item may be
    dropped instead of processed. ``processed`` counts items a worker finished, successfully or
    not (``errors`` is the failed part), plus items taken with ``get()`` and marked ``task_done()``.

    Args:
        maxsize: Maximum number of queued items (at least 1).
        timeout: Default wait in seconds of ``put`` (block policy) and ``get``.
        logger: Logger for worker errors and shutdown; defaults to this module's logger.
        overflow: What ``put`` does when the queue is full (an :class:`OverflowPolicy` or its
            value).
        grace_period_s: Default ``stop()`` timeout: how long workers get to finish before they are
            cancelled.
        on_drop: Called synchronously with each item an overflow policy drops (to log or count it).

    Raises:
        ValueError: ``maxsize`` is below 1, a timeout is negative, or ``overflow`` is unknown.
    """

    def __init__(
        self,
        maxsize: int = 100,
        timeout: float = 0.1,
        logger: logging.Logger | None = None,
        overflow: OverflowPolicy | str = OverflowPolicy.BLOCK,
        *,
        grace_period_s: float = 5.0,
        on_drop: Callable[[T], object] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        if timeout < 0:
            raise ValueError(f"timeout must not be negative, got {timeout}")
        if grace_period_s < 0:
            raise ValueError(f"grace_period_s must not be negative, got {grace_period_s}")
        self._maxsize = maxsize
        self._timeout = timeout
        self._grace_period_s = grace_period_s
        self._logger = logger or _log
        self._overflow = OverflowPolicy(overflow)
        self._on_drop = on_drop

        self._status = QueueStatus.IDLE
        # True exactly while PROCESSING: the hot paths test one bool instead of comparing enums.
        self._accepting = False
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[bool]] = deque()  # idle workers and get() callers
        self._putters: deque[asyncio.Future[bool]] = deque()  # put() callers waiting for room
        self._unfinished = 0  # queued + in flight; join() waits for it to reach 0
        self._handed_out = 0  # taken by get() and not yet marked task_done()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._workers: set[asyncio.Task[None]] = set()
        # Workers that ignored cancellation at stop(); kept referenced so they are not collected
        # while pending, and forgotten as soon as they finish.
        self._stragglers: set[asyncio.Task[None]] = set()
        self._stopper: asyncio.Task[int] | None = None
        # Bumped by every stop(): a worker of an earlier run (one that swallowed its cancellation)
        # must not come back to life as an untracked worker after a restart.
        self._epoch = 0

        self._enqueued = 0
        self._processed = 0
        self._errors = 0
        self._error_handler_errors = 0
        self._backpressure_events = 0
        self._dropped = 0
        self._discarded = 0
        self._cancelled = 0
        self._high_water = 0

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._status.value} size={len(self._items)}/{self._maxsize}"
            f" workers={len(self._workers)} overflow={self._overflow.value}>"
        )

    # -- introspection -------------------------------------------------------------------------

    @property
    def status(self) -> QueueStatus:
        """The current lifecycle state."""
        return self._status

    @property
    def maxsize(self) -> int:
        """The maximum number of queued items."""
        return self._maxsize

    @property
    def timeout(self) -> float:
        """The default wait of ``put`` and ``get``, in seconds."""
        return self._timeout

    @property
    def grace_period_s(self) -> float:
        """The default ``stop()`` timeout, in seconds."""
        return self._grace_period_s

    @property
    def overflow(self) -> OverflowPolicy:
        """What ``put`` does when the queue is full."""
        return self._overflow

    @property
    def size(self) -> int:
        """The number of queued items (not counting items being processed)."""
        return len(self._items)

    @property
    def is_full(self) -> bool:
        """Whether the queue holds ``maxsize`` items."""
        return len(self._items) >= self._maxsize

    @property
    def is_empty(self) -> bool:
        """Whether no item is queued."""
        return not self._items

    @property
    def worker_count(self) -> int:
        """The number of live worker tasks."""
        return len(self._workers)

    @property
    def metrics(self) -> dict[str, int]:
        """A snapshot of the counters, the current size and the high-water mark."""
        size = len(self._items)
        return {
            "enqueued": self._enqueued,
            "processed": self._processed,
            "errors": self._errors,
            "error_handler_errors": self._error_handler_errors,
            "backpressure_events": self._backpressure_events,
            "dropped": self._dropped,
            "discarded": self._discarded,
            "cancelled": self._cancelled,
            "size": size,
            "in_flight": self._unfinished - size,
            "high_water_mark": self._high_water,
        }

    # -- producing -----------------------------------------------------------------------------

    # seed 003's API names the argument `timeout`; it is a bound on the wait, not a cancel scope.
    async def put(self, item: T, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Add an item, applying the overflow policy when the queue is full.

        Args:
            item: The item to enqueue.
            timeout: For the block policy, how long to wait for room, in seconds (default: the
                queue's ``timeout``; ``math.inf`` waits until there is room or the queue stops).

        Returns:
            True if the item was accepted, False if backpressure was applied (block policy: the
            queue stayed full for the whole timeout). Drop policies always accept; the item they
            drop is counted in ``metrics["dropped"]``.

        Raises:
            QueueStateError: The queue is not PROCESSING (or stopped while this call waited).
            QueueFullError: The queue is full and the policy is reject.
        """
        if not self._accepting:
            raise self._state_error("put")
        if len(self._items) < self._maxsize:
            self._accept(item)
            return True
        if self._overflow is OverflowPolicy.BLOCK:
            return await self._wait_for_room(item, self._timeout if timeout is None else timeout)
        self._overflow_now(item)
        return True

    def put_nowait(self, item: T) -> None:
        """Add an item without waiting, applying the overflow policy when the queue is full.

        Raises:
            QueueStateError: The queue is not PROCESSING.
            QueueFullError: The queue is full and the policy is block or reject.
        """
        if not self._accepting:
            raise self._state_error("put_nowait")
        if len(self._items) < self._maxsize:
            self._accept(item)
        elif self._overflow is OverflowPolicy.BLOCK:
            self._backpressure_events += 1
            raise self._full_error()
        else:
            self._overflow_now(item)

    def _accept(self, item: T) -> None:
        items = self._items
        items.append(item)
        self._enqueued += 1
        if not self._unfinished:
            self._all_done.clear()
        self._unfinished += 1
        if len(items) > self._high_water:
            self._high_water = len(items)
        if self._getters:
            _wake_next(self._getters)

    def _overflow_now(self, item: T) -> None:
        """Apply a non-blocking overflow policy to ``item`` on a full queue."""
        if self._overflow is OverflowPolicy.REJECT:
            self._backpressure_events += 1
            raise self._full_error()
        # Both drop policies accept the item and lose one: the count of unfinished items is
        # unchanged, and a full queue has no waiting consumer to wake.
        self._enqueued += 1
        self._dropped += 1
        if self._overflow is OverflowPolicy.DROP_OLDEST:
            lost = self._items.popleft()
            self._items.append(item)
        else:
            lost = item
        if self._on_drop is not None:
            try:
                self._on_drop(lost)
            except Exception:
                self._logger.exception("on_drop callback failed", extra={"action": "drop"})

    async def _wait_for_room(self, item: T, wait_s: float) -> bool:
        if wait_s > 0:
            deadline = _deadline(wait_s)
            while True:
                timed_out = await _wait(self._putters, deadline)
                # stop() wakes every waiting producer; room made by discarding the backlog is
                # not room for new items.
                if not self._accepting:
                    raise self._state_error("put")
                if len(self._items) < self._maxsize:
                    self._accept(item)
                    return True
                if timed_out:
                    break
        self._backpressure_events += 1
        return False

    # -- consuming -----------------------------------------------------------------------------

    async def get(self, timeout: float | None = None) -> T:  # noqa: ASYNC109
        """Take the oldest item, waiting for one up to the timeout; call :meth:`task_done` after.

        Args:
            timeout: How long to wait for an item, in seconds (default: the queue's ``timeout``).

        Raises:
            QueueStateError: The queue is not PROCESSING (or stopped while this call waited).
            QueueEmptyError: No item arrived within the timeout.
        """
        if not self._accepting:
            raise self._state_error("get")
        if not self._items:
            wait_s = self._timeout if timeout is None else timeout
            if wait_s <= 0:
                raise QueueEmptyError("the queue is empty")
            deadline = _deadline(wait_s)
            while not self._items:
                timed_out = await _wait(self._getters, deadline)
                if not self._accepting:
                    raise self._state_error("get")
                if timed_out and not self._items:
                    raise QueueEmptyError(f"no item arrived within {wait_s:g}s")
        return self._take()

    def get_nowait(self) -> T:
        """Take the oldest item without waiting; call :meth:`task_done` after.

        Raises:
            QueueStateError: The queue is not PROCESSING.
            QueueEmptyError: The queue is empty.
        """
        if not self._accepting:
            raise self._state_error("get_nowait")
        if not self._items:
            raise QueueEmptyError("the queue is empty")
        return self._take()

    def _take(self) -> T:
        item = self._items.popleft()
        self._handed_out += 1
        if self._putters:
            _wake_next(self._putters)
        return item

    def task_done(self) -> None:
        """Mark an item taken with ``get``/``get_nowait`` as processed (workers do this themselves).

        Raises:
            ValueError: Called more times than items were taken.
        """
        if self._handed_out <= 0:
            raise ValueError("task_done() called more times than get() handed out items")
        self._handed_out -= 1
        self._processed += 1
        self._finish_one()

    def _finish_one(self) -> None:
        self._unfinished -= 1
        if not self._unfinished:
            self._all_done.set()

    async def join(self) -> None:
        """Wait until every accepted item has been processed, dropped, discarded or cancelled.

        This waits for workers, so it waits without a bound if none are running; wrap it in
        ``asyncio.timeout`` where that can happen. ``stop()`` always releases it.
        """
        if self._unfinished:
            await self._all_done.wait()

    # -- workers -------------------------------------------------------------------------------

    async def start_workers(
        self,
        worker_func: WorkerFunc[T],
        num_workers: int,
        error_handler: ErrorHandler[T] | None = None,
    ) -> None:
        """Start worker tasks that call ``worker_func(item)`` for each queued item.

        A worker function that raises never kills its worker: the error is counted and passed to
        ``error_handler(exc, item)`` (or logged), and the worker goes on with the next item.

        Args:
            worker_func: Async function that processes one item.
            num_workers: Number of worker tasks (at least 1).
            error_handler: Optional async function called with ``(exc, item)`` on failure.

        Raises:
            QueueStateError: The queue is not PROCESSING, or its workers are already running.
            ValueError: ``num_workers`` is below 1.
        """
        if not self._accepting:
            raise self._state_error("start_workers")
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if self._workers:
            raise QueueStateError(
                f"start_workers(): {len(self._workers)} workers are already running; "
                "stop() the queue before starting others",
                operation="start_workers",
                status=self._status.value,
            )
        for index in range(num_workers):
            task = asyncio.create_task(
                self._work(worker_func, error_handler), name=f"conveyor.local.worker-{index}"
            )
            self._workers.add(task)
            task.add_done_callback(self._worker_done)

    async def _work(
        self, worker_func: WorkerFunc[T], error_handler: ErrorHandler[T] | None
    ) -> None:
        """One worker: take items until the queue stops and has nothing left to drain."""
        items = self._items
        putters = self._putters
        epoch = self._epoch
        while True:
            if self._epoch != epoch:
                return
            if not items:
                if not self._accepting:
                    return
                await _wait(self._getters)
                continue
            item = items.popleft()
            if putters:
                _wake_next(putters)
            try:
                await worker_func(item)
            except Exception as exc:
                self._processed += 1
                self._errors += 1
                try:
                    await self._report(exc, item, error_handler)
                finally:
                    self._finish_one()
            except BaseException:
                # Cancelled by stop() after the grace period (or interrupted): the item was not
                # processed. Count it and let the cancellation through.
                self._cancelled += 1
                self._finish_one()
                raise
            else:
                self._processed += 1
                self._finish_one()
            # An idle worker must not keep the last item alive.
            del item

    async def _report(self, exc: Exception, item: T, error_handler: ErrorHandler[T] | None) -> None:
        if error_handler is None:
            self._logger.error(
                "worker_func failed on %s",
                reprlib.repr(item),
                exc_info=exc,
                extra={"action": "work"},
            )
            return
        try:
            await error_handler(exc, item)
        except Exception:
            self._error_handler_errors += 1
            self._logger.exception(
                "error_handler failed while handling %r", exc, extra={"action": "work"}
            )

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        self._stragglers.discard(task)
        if task.cancelled():
            if self._accepting:
                self._logger.warning(
                    "worker %s was cancelled while the queue is processing; %d workers left",
                    task.get_name(),
                    len(self._workers),
                    extra={"action": "work"},
                )
            return
        exc = task.exception()
        if exc is not None:
            self._logger.error(
                "worker %s died", task.get_name(), exc_info=exc, extra={"action": "work"}
            )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the queue for ``put``, ``get`` and workers; a no-op if it is already PROCESSING.

        A STOPPED queue can be started again; its metrics carry on.

        Raises:
            QueueStateError: The queue is STOPPING.
        """
        if self._status is QueueStatus.PROCESSING:
            return
        if self._status is QueueStatus.STOPPING:
            raise self._state_error("start")
        self._status = QueueStatus.PROCESSING
        self._accepting = True

    async def stop(self, timeout: float | None = None, *, drain: bool = True) -> int:  # noqa: ASYNC109
        """Stop accepting items, stop the workers, and release the worker function.

        Steps: refuse new items and wake every waiting producer and consumer (they raise
        :class:`QueueStateError`); with ``drain`` let the workers finish the queued items,
        without it discard them; after ``timeout`` cancel the workers still busy and discard what
        is left. Returns within ``timeout`` + 100 ms. Idempotent: concurrent and repeated calls
        share one shutdown, and a caller cancelled while waiting does not interrupt it.

        Args:
            timeout: Seconds the workers get to finish (default: ``grace_period_s``).
            drain: Process the queued items (True) or discard them (False).

        Returns:
            The number of queued items discarded (all of them without ``drain``; with it, those
            left when the timeout ran out or when no worker was running).
        """
        if self._status is QueueStatus.IDLE:
            self._status = QueueStatus.STOPPED
            return 0
        if self._status is QueueStatus.PROCESSING:
            self._status = QueueStatus.STOPPING
            self._accepting = False
            # 1. Without drain, or with no worker to drain it, the backlog goes now, before any
            #    worker gets the loop back and takes another item.
            discarded = self._discard_queued() if not drain or not self._workers else 0
            # 2. Everyone blocked on the queue re-checks the state: producers and get() callers
            #    raise QueueStateError, idle workers see nothing left to drain and return.
            _wake_all(self._putters)
            _wake_all(self._getters)
            grace = self._grace_period_s if timeout is None else max(0.0, timeout)
            self._stopper = asyncio.create_task(
                self._shutdown(grace, discarded), name="conveyor.local.stop"
            )
        stopper = self._stopper
        if stopper is None:  # already STOPPED
            return 0
        # The shutdown runs in its own task so that cancelling this caller cannot leave the
        # queue half stopped; shield() lets the caller go while the shutdown completes.
        return await asyncio.shield(stopper)

    async def _shutdown(self, grace_s: float, discarded: int) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        try:
            # 3. Workers finish their item (and, with drain, the backlog) within the grace period.
            workers = set(self._workers)
            if workers:
                _, busy = await asyncio.wait(workers, timeout=max(0.0, deadline - loop.time()))
                # 4. Cancel the workers still busy, and give the cancellation a bounded moment.
                if busy:
                    self._logger.warning(
                        "%d workers still busy after %gs; cancelling them",
                        len(busy),
                        grace_s,
                        extra={"action": "stop"},
                    )
                    await self._cancel_workers(busy)
        finally:
            # 5. Whatever the grace period left queued is discarded, even if this task itself is
            #    cancelled, so the queue always ends STOPPED and empty; a worker still running
            #    then (only if this task was cancelled mid-way) is cancelled without waiting.
            discarded += self._discard_queued()
            for task in self._workers - self._stragglers:
                task.cancel()
                self._stragglers.add(task)
            self._workers.clear()
            self._epoch += 1
            self._status = QueueStatus.STOPPED
            self._stopper = None
        if discarded:
            self._logger.info(
                "discarded %d queued items at stop", discarded, extra={"action": "stop"}
            )
        return discarded

    async def _cancel_workers(self, busy: set[asyncio.Task[None]]) -> None:
        for task in busy:
            task.cancel()
        _, stuck = await asyncio.wait(busy, timeout=_CANCEL_GRACE_S)
        if stuck:
            self._stragglers |= stuck
            self._logger.error(
                "%d workers ignored cancellation (a worker_func swallows CancelledError); "
                "abandoning them",
                len(stuck),
                extra={"action": "stop"},
            )

    def _discard_queued(self) -> int:
        count = len(self._items)
        if count:
            self._items.clear()
            self._discarded += count
            self._unfinished -= count
            if not self._unfinished:
                self._all_done.set()
        return count

    async def __aenter__(self) -> Self:
        """Start the queue."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the queue: drain it, unless the block is left because it was cancelled."""
        cancelled = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
        await self.stop(drain=not cancelled)

    # -- errors --------------------------------------------------------------------------------

    def _state_error(self, operation: str) -> QueueStateError:
        if self._status is QueueStatus.IDLE:
            hint = "call start() or enter 'async with' first"
        elif self._status is QueueStatus.PROCESSING:
            hint = "stop() it first"
        else:
            hint = "it was stopped; start() it again to reuse it"
        return QueueStateError(
            f"{operation}() needs a processing queue, but it is {self._status.value}; {hint}",
            operation=operation,
            status=self._status.value,
        )

    def _full_error(self) -> QueueFullError:
        return QueueFullError(
            f"the queue is full ({self._maxsize} items, overflow={self._overflow.value}); "
            "retry later, or use put() to wait with backpressure",
            maxsize=self._maxsize,
        )


def _deadline(wait_s: float) -> float | None:
    """The loop time ``wait_s`` seconds from now; None for an unbounded (infinite) wait."""
    return None if math.isinf(wait_s) else asyncio.get_running_loop().time() + wait_s


async def _wait(waiters: deque[asyncio.Future[bool]], deadline: float | None = None) -> bool:
    """Wait in line on ``waiters`` until woken or until ``deadline``; True if the deadline passed.

    A plain timer resolves the waiter at the deadline, rather than asyncio.timeout() cancelling
    the waiting task: that is cheaper on the path a producer takes each time the queue is full,
    and a wake-up can never race with a cancellation.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bool] = loop.create_future()
    waiters.append(fut)
    timer = None if deadline is None else loop.call_at(deadline, _expire, waiters, fut)
    try:
        return await fut
    except BaseException:
        fut.cancel()
        with contextlib.suppress(ValueError):
            waiters.remove(fut)
        if not fut.cancelled():
            # We were woken (room, or an item) but are leaving; wake the next one in line so the
            # wake-up is not lost.
            _wake_next(waiters)
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _expire(waiters: deque[asyncio.Future[bool]], fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        # Still in line (a wake-up takes its waiter out as it resolves it): leave the line.
        with contextlib.suppress(ValueError):
            waiters.remove(fut)
        fut.set_result(True)


def _wake_next(waiters: deque[asyncio.Future[bool]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(False)
            return


def _wake_all(waiters: deque[asyncio.Future[bool]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(False)
