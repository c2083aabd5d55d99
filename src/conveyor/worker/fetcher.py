"""The fetcher: reserves only what a free executor slot can run now, and blocks when it cannot.

Prefetch is exactly free capacity. For each queue, ``n`` is the smallest number of free slots
among the executors its tasks use, minus the slots already promised to jobs reserved but not yet
started; a full pool means "don't fetch", never "fetch, then requeue with backoff". Reserving
``n`` at a time makes a drain one broker round trip per batch, not per job.

Waiting acks of a queue ride along with its reserve (``broker.ack_and_reserve``, see
:meth:`Committer.take_acks <conveyor.worker.committer.Committer.take_acks>`): refilling the slots
that finished runs freed costs one round trip, with no ack queued ahead of (or behind) it.

When nothing was reserved the fetcher never sleep-polls: with free capacity it blocks on
``broker.wait_for_jobs`` (at most 1 s at a time), and when capacity-bound on the "slot freed"
event the runner sets when a run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from conveyor.brokers.base import Broker
from conveyor.errors import BrokerReadOnly, BrokerUnavailable
from conveyor.job import Job, Lease
from conveyor.metrics import Metrics
from conveyor.worker.circuit import Circuit
from conveyor.worker.interfaces import Executor
from conveyor.worker.leases import ActiveJob

if TYPE_CHECKING:
    from conveyor.worker.committer import Committer

logger = logging.getLogger(__name__)

#: The most jobs one reserve call asks for. It bounds the size of a broker reply and, above all,
#: how many jobs start in one step of the event loop: every job's first step runs before the
#: loop turns again, so 10,000 at once stalled the loop for seconds; 100 keeps a step short
#: while a drain still costs one round trip per hundred jobs.
MAX_RESERVE: Final = 100
#: The longest single wait_for_jobs call: the fetcher re-checks its state at least this often.
WAIT_S: Final = 1.0


class Slots:
    """Free capacity per executor, net of promises to reserved-but-unstarted jobs.

    Args:
        executors: the running executors by kind.
        queue_kinds: for each queue, the executor kinds its tasks use.
    """

    def __init__(
        self, executors: Mapping[str, Executor], queue_kinds: Mapping[str, Sequence[str]]
    ) -> None:
        self._executors = dict(executors)
        self._queue_kinds = {q: tuple(kinds) for q, kinds in queue_kinds.items()}
        self.promised = dict.fromkeys(self._executors, 0)
        #: set when a run ends (a slot is free), on stop, and when a burst worker goes idle.
        self.wake = asyncio.Event()
        self._slot_waiters: list[asyncio.Future[None]] = []

    def capacity(self, queue: str) -> int:
        """How many jobs of ``queue`` could start right now."""
        n = MAX_RESERVE
        executors = self._executors
        promised = self.promised
        for kind in self._queue_kinds[queue]:
            free = executors[kind].free_slots - promised[kind]
            if free < n:
                n = free
        return n

    def full_kinds(self, queue: str) -> list[str]:
        """The executor kinds of ``queue`` that have no free slot."""
        return [k for k in self._queue_kinds[queue] if self.capacity_of(k) <= 0]

    def capacity_of(self, kind: str) -> int:
        """Free slots of executor ``kind`` net of promises."""
        return self._executors[kind].free_slots - self.promised[kind]

    def promise(self, aj: ActiveJob) -> None:
        """Hold a slot of ``aj.kind`` for a reserved job until it starts (or is dropped)."""
        kind = aj.kind
        if kind is not None and kind in self.promised:
            self.promised[kind] += 1
            aj.promised = True

    def fulfil(self, aj: ActiveJob) -> None:
        """The promise of ``aj`` is over (it started, or will never start); idempotent."""
        if aj.promised:
            aj.promised = False
            self.promised[aj.kind] -= 1  # type: ignore[index]  # promised implies a kind

    def freed(self) -> None:
        """A run ended: wake the fetcher (and any job waiting for a slot)."""
        self.wake.set()
        if self._slot_waiters:
            waiters, self._slot_waiters = self._slot_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait_free(self, executor: Executor) -> None:
        """Wait until ``executor`` has a free slot.

        Only a job whose task runs on an executor its queue's tasks do not use (a task enqueued to
        another task's queue) can find its executor full: capacity was counted for the queue's
        usual executors. It waits here rather than overfilling the pool.
        """
        while executor.free_slots <= 0:
            fut = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(fut)
            await fut


class Fetcher:
    """The reserve loop.

    Args:
        broker: where jobs are reserved.
        queues: consumed queues, in the order they are served.
        slots: the capacity bookkeeping.
        spawn: starts a reserved job (adds it to the worker's active set and creates its task).
        lease_s: the lease each reserve asks for.
        worker_id: recorded on reserved jobs.
        metrics: counts fetches skipped for lack of a free slot.
        ensure_connected: awaited before each round after an outage.
        burst: return once the queues are drained and nothing runs.
        is_idle: whether the worker holds no job at all (burst mode).
        committer: whose waiting acks each reserve carries (``ack_and_reserve``); None: none.
        burst_wait_s: burst mode: a scheduled job of the queues due within this many seconds
            (a retry in backoff) keeps the fetcher waiting for it; one due later does not.
    """

    def __init__(
        self,
        broker: Broker,
        queues: Sequence[str],
        slots: Slots,
        *,
        spawn: Callable[[Job], None],
        lease_s: float,
        worker_id: str,
        metrics: Metrics,
        ensure_connected: Callable[[], Awaitable[None]],
        burst: bool = False,
        is_idle: Callable[[], bool] = lambda: False,
        committer: Committer | None = None,
        burst_wait_s: float = 10.0,
    ) -> None:
        self._broker = broker
        self._queues = list(queues)
        self._slots = slots
        self._spawn = spawn
        self.lease_s = lease_s
        self.worker_id = worker_id
        self._metrics = metrics
        self._ensure_connected = ensure_connected
        self._burst = burst
        self._is_idle = is_idle
        self._committer = committer
        self._burst_wait_ms = max(0, round(burst_wait_s * 1000))
        self.circuit = Circuit("fetcher", worker_id)
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.last_reserve_ms = 0
        self.drained = False
        #: when the loop last showed progress (an iteration began, a reserve returned, a wait
        #: for a free slot ended)
        self.progress_at = time.monotonic()
        #: True while every slot is busy: no progress is expected until a run ends
        self.slot_bound = False

    def stalled_s(self) -> float:
        """How long the loop has shown no progress (0 while it legitimately waits for a slot).

        Between two signs of progress there is at most one bounded broker call, one wait of at
        most ``WAIT_S`` or one back-off of at most the circuit's cap, so a figure beyond those
        means the loop is stuck (see :meth:`Worker.health <conveyor.worker.worker.Worker.health>`).
        """
        if self.slot_bound:
            return 0.0
        return max(0.0, time.monotonic() - self.progress_at)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping

    def stop(self) -> None:
        """Stop reserving: the loop returns after the call in flight."""
        self._stopping = True
        self._stop_event.set()
        self._slots.wake.set()

    async def run(self) -> None:
        """Reserve and spawn until stopped (or, in burst mode, drained)."""
        connected = False
        while not self._stopping:
            self.progress_at = time.monotonic()
            try:
                if not connected:
                    await self._ensure_connected()
                    connected = True
                reserved, more, free_queues = await self._round()
                if not reserved and self._burst and await self._drained(free_queues):
                    self.drained = True
                    return
                self.circuit.success()
                if reserved:
                    # Let the jobs just spawned start before this loop sends its next command.
                    await asyncio.sleep(0)
                if not more:
                    await self._wait(free_queues)
            except (BrokerUnavailable, BrokerReadOnly) as exc:
                connected = False
                await self._sleep(self.circuit.failure(exc))

    async def _round(self) -> tuple[bool, bool, list[str]]:
        """One reserve per queue with capacity.

        Returns whether any job came, whether a queue may hold more (it filled its batch, so
        reserving again at once is worth it; a short batch means it was empty a moment ago, so
        the next step is to wait), and the queues that had room.
        """
        reserved = False
        more = False
        free_queues: list[str] = []
        slots = self._slots
        broker = self._broker
        # From here on, a freed slot is news: capacity is computed after this point.
        slots.wake.clear()
        for queue in self._queues:
            n = slots.capacity(queue)
            if n <= 0:
                for kind in slots.full_kinds(queue):
                    self._metrics.fetch_saturated(kind)
                continue
            free_queues.append(queue)
            acks = self._committer.take_acks(queue) if self._committer is not None else None
            if acks:
                jobs = await self._ack_and_reserve(acks, queue, n)
            else:
                jobs = await broker.reserve(
                    queue, n, lease_s=self.lease_s, worker_id=self.worker_id
                )
            self.progress_at = time.monotonic()  # a broker call returned: the loop lives
            if jobs:
                reserved = True
                more = more or len(jobs) >= n
                spawn = self._spawn
                for job in jobs:
                    spawn(job)
            if self._stopping:
                break
        if free_queues:
            self.last_reserve_ms = broker.clock.now_ms()
        return reserved, more, free_queues

    async def _ack_and_reserve(
        self, acks: list[tuple[ActiveJob, Any]], queue: str, n: int
    ) -> list[Job]:
        """Reserve with the waiting acks of ``queue``; they go back to the committer on failure.

        Only an outage fails the round (the committer then retries the acks with its own
        backoff). Any other failure is the acks' business: the committer writes (and, if need
        be, isolates) them, and this round reserves on its own.
        """
        committer = self._committer
        assert committer is not None
        items: list[tuple[Lease, Any]] = [(aj.lease, result) for aj, result in acks]
        try:
            held, jobs = await self._broker.ack_and_reserve(
                items, queue, n, lease_s=self.lease_s, worker_id=self.worker_id
            )
        except (BrokerUnavailable, BrokerReadOnly):
            committer.acks_not_written(acks)
            raise
        except Exception:
            logger.warning(
                "worker %s: ack_and_reserve failed; the committer writes the acks instead",
                self.worker_id,
                exc_info=True,
                extra={"action": "ack_and_reserve", "queue": queue},
            )
            committer.acks_not_written(acks)
            return await self._broker.reserve(
                queue, n, lease_s=self.lease_s, worker_id=self.worker_id
            )
        except BaseException:
            committer.acks_not_written(acks)
            raise
        committer.acks_written(acks, held)
        return jobs

    async def _drained(self, free_queues: list[str]) -> bool:
        """Burst mode: True when the queues are empty, nothing runs, and nothing is due soon.

        "Soon" is ``burst_wait_s``: a retry in backoff (or any job scheduled that close) keeps
        the worker until it falls due and has run; the wait blocks on the broker
        (``wait_for_jobs`` wakes when a scheduled job falls due), it never polls. A job
        scheduled further out is left for a later worker.
        """
        if len(free_queues) != len(self._queues) or not self._is_idle():
            return False
        broker = self._broker
        promoted = 0
        for queue in self._queues:
            promoted += await broker.promote_scheduled(queue)
        if promoted:
            return False
        horizon = broker.clock.now_ms() + self._burst_wait_ms
        for queue in self._queues:
            due = await broker.next_scheduled_ms(queue)
            if due is not None and due <= horizon:
                return False
        return True

    async def _wait(self, free_queues: list[str]) -> None:
        wake = self._slots.wake  # cleared when the round began
        if not free_queues:
            # Capacity-bound: only a finished run (or stop) can change anything.
            self.slot_bound = True
            try:
                await wake.wait()
            finally:
                self.slot_bound = False
                self.progress_at = time.monotonic()
            # Runs that end in the same tick free their slots together: take them as one batch.
            await asyncio.sleep(0)
            return
        # Room for more: block on the broker; also on freed slots when some queue is full (or in
        # burst mode, to notice going idle), else only on stop.
        bound = len(free_queues) != len(self._queues) or self._burst
        event = wake if bound else self._stop_event
        if event.is_set():
            return
        waiter = asyncio.ensure_future(self._broker.wait_for_jobs(free_queues, WAIT_S))
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((waiter, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, waker):
                if not fut.done():
                    fut.cancel()
            # Collect both so neither is left pending (or its exception unretrieved).
            await asyncio.gather(waiter, waker, return_exceptions=True)
        if waiter.done() and not waiter.cancelled():
            exc = waiter.exception()
            if exc is not None:
                raise exc

    async def _sleep(self, delay: float) -> None:
        """Back off, but wake at once on stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop_event.wait()


__all__ = ["MAX_RESERVE", "Fetcher", "Slots"]
