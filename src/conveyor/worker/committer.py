"""Writes job outcomes to the broker: acks in batches, the rest one by one, through outages.

Acks are the hot path, so they go through a batch: the runner appends ``(job, result)`` and
returns, and one flusher task writes everything that has accumulated with a single
``ack_many``. The batch forms by itself while the previous write is in flight (group commit),
so an idle worker acks at once and a busy one acks hundreds per round trip, without a timer that
would add latency for nothing. ``retry``, ``dead_letter`` and ``release`` are rarer and are
written individually by the job's own task, which waits for the answer.

When finished runs free slots, the fetcher's next reserve carries the waiting acks of its queue
(:meth:`Committer.take_acks`, then ``broker.ack_and_reserve``): one round trip refills the slots
and stores the outcomes. The flusher lets the fetcher go first (a few loop turns) and writes
whatever is left.

Outcomes of a write:

* written: the job is settled with its outcome;
* :class:`~conveyor.errors.LeaseLost` / :class:`~conveyor.errors.JobNotFound`: the job moved on
  (cancelled, deleted, re-delivered after its lease expired); logged at info and dropped;
* :class:`~conveyor.errors.BrokerUnavailable`: the outcome stays in memory and is retried with
  capped backoff until it is written or the broker says the lease is gone. Meanwhile the
  heartbeat keeps renewing the lease, so an outcome is never both written and left to expire.
  Only a shutdown whose flush deadline passes gives up (:meth:`Committer.abandon`): those jobs
  are then recovered by lease expiry, charged one attempt (documented at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from conveyor.brokers.base import Broker
from conveyor.errors import BrokerReadOnly, BrokerUnavailable, JobNotFound, LeaseLost
from conveyor.job import Job
from conveyor.worker.circuit import Circuit
from conveyor.worker.leases import ActiveJob, Outcome

logger = logging.getLogger(__name__)

COMPLETED: Final = Outcome.COMPLETED
RETRIED: Final = Outcome.RETRIED
DEAD_LETTERED: Final = Outcome.DEAD_LETTERED
RELEASED: Final = Outcome.RELEASED
LEASE_LOST: Final = Outcome.LEASE_LOST
CANCELLED: Final = Outcome.CANCELLED
ABANDONED: Final = Outcome.ABANDONED
ERROR: Final = Outcome.ERROR

#: Loop iterations the flusher lets pass before writing (see Committer.run).
_YIELDS_BEFORE_FLUSH: Final = 3

_UNREACHABLE: Final = (BrokerUnavailable, BrokerReadOnly)
_MOVED_ON: Final = (LeaseLost, JobNotFound)

Settle = Callable[[ActiveJob, Outcome], None]
_T = TypeVar("_T")


class Committer:
    """Records outcomes for the runner and tells the worker when each job is settled.

    Args:
        broker: where outcomes are written.
        max_batch: the most acks per ``ack_many``.
        on_settled: called (on the loop) once per job with its
            :class:`~conveyor.worker.leases.Outcome`.
        worker_id: for log lines.
    """

    def __init__(
        self, broker: Broker, *, max_batch: int, on_settled: Settle, worker_id: str = ""
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._broker = broker
        self._max_batch = max_batch
        self._settle = on_settled
        self.worker_id = worker_id
        self.circuit = Circuit("committer", worker_id)
        self._acks: list[tuple[ActiveJob, Any]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._abandoned = asyncio.Event()
        self._writing = False
        self._inflight = 0  # individual writes in progress
        self._borrowed = 0  # acks handed to the fetcher (take_acks), not yet reported back

    @property
    def pending(self) -> int:
        """Outcomes not yet written (acks waiting or being written, plus individual writes)."""
        return len(self._acks) + self._inflight + self._borrowed + (1 if self._writing else 0)

    # -- acks (batched) ----------------------------------------------------------------------------

    def ack(self, aj: ActiveJob, result: Any) -> None:
        """Queue a successful outcome for the next batch (returns at once)."""
        if self._abandoned.is_set():
            self._settle(aj, ABANDONED)
            return
        acks = self._acks
        acks.append((aj, result))
        if len(acks) == 1:
            self._idle.clear()
            self._wake.set()

    def take_acks(self, queue: str) -> list[tuple[ActiveJob, Any]]:
        """Hand the waiting acks of ``queue`` (up to one batch) to the caller to write.

        The fetcher writes them together with its reserve (``ack_and_reserve``) and reports
        back with :meth:`acks_written` or :meth:`acks_not_written`; until then they count as
        pending (a flush waits for them).
        """
        acks = self._acks
        if not acks or self._abandoned.is_set():
            return []
        limit = self._max_batch
        if len(acks) <= limit and all(aj.lease.queue == queue for aj, _ in acks):
            taken, self._acks = acks, []  # the common case: one queue, one batch
        else:
            taken, rest = [], []
            for item in acks:
                if len(taken) < limit and item[0].lease.queue == queue:
                    taken.append(item)
                else:
                    rest.append(item)
            if not taken:
                return []
            self._acks = rest
        self._borrowed += len(taken)
        return taken

    def acks_written(self, batch: list[tuple[ActiveJob, Any]], held: list[bool]) -> None:
        """Taken acks were written: settle each (False: the job had moved on)."""
        self._borrowed -= len(batch)
        self.circuit.success()
        self._settle_acks(batch, held)
        self._check_idle()

    def acks_not_written(self, batch: list[tuple[ActiveJob, Any]]) -> None:
        """Taken acks could not be written (or may not have been): the flusher takes them over.

        An ack that was in fact stored before the failure comes back from the broker as stale
        and is settled as ``lease_lost`` (logged): the job is completed either way.
        """
        self._borrowed -= len(batch)
        if self._abandoned.is_set():
            for aj, _ in batch:
                self._settle(aj, ABANDONED)
            self._check_idle()
            return
        self._acks[:0] = batch
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The flusher: write accumulated acks until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let the fetcher, woken by the same finished runs, go first: its reserve carries
            # these acks (ack_and_reserve), and the next jobs' start waits on that reserve while
            # nobody waits on an ack. (A timer linger here would add wake-ups instead.)
            for _ in range(_YIELDS_BEFORE_FLUSH):
                if not self._acks:
                    break  # the fetcher took them: no more loop turns to spend here
                await asyncio.sleep(0)
            while self._acks:
                batch = self._acks[: self._max_batch]
                del self._acks[: self._max_batch]
                self._writing = True
                try:
                    await self._write_acks(batch)
                finally:
                    self._writing = False
            self._check_idle()

    async def _write_acks(self, batch: list[tuple[ActiveJob, Any]]) -> None:
        items = [(aj.lease, result) for aj, result in batch]
        while True:
            try:
                held = await self._broker.ack_many(items)
            except _UNREACHABLE as exc:
                if await self._backoff(exc):
                    continue
                for aj, _ in batch:
                    self._settle(aj, ABANDONED)
                return
            except Exception:
                # Not an outage (a result the broker refused?): isolate the culprit by acking
                # one by one, so one bad job cannot hold back the others.
                logger.exception(
                    "worker %s: ack_many of %d jobs failed; acking them one by one",
                    self.worker_id,
                    len(batch),
                    extra={"action": "ack"},
                )
                for aj, result in batch:
                    await self._write(aj, COMPLETED, functools.partial(self._ack_one, aj, result))
                return
            self.circuit.success()
            self._settle_acks(batch, held)
            return

    def _settle_acks(self, batch: list[tuple[ActiveJob, Any]], held: list[bool]) -> None:
        settle = self._settle
        for (aj, _), ok in zip(batch, held, strict=True):
            if ok:
                settle(aj, COMPLETED)
            else:
                _log_moved_on(aj, "ack")
                settle(aj, LEASE_LOST)

    async def _ack_one(self, aj: ActiveJob, result: Any) -> None:
        await self._broker.ack(aj.lease, result)

    def drop(self, aj: ActiveJob) -> None:
        """Settle a job whose run was stopped because its lease was revoked: nothing to write."""
        self._settle(aj, CANCELLED)

    # -- individual transitions -------------------------------------------------------------------

    async def retry(
        self, aj: ActiveJob, *, run_at_ms: int, error: str | None, traceback: str | None
    ) -> Job | None:
        """Write ``retry``; the updated job, or None (moved on or abandoned)."""
        return await self._write(
            aj,
            RETRIED,
            lambda: self._broker.retry(
                aj.lease, run_at_ms=run_at_ms, error=error, traceback=traceback
            ),
        )

    async def dead_letter(
        self, aj: ActiveJob, *, reason: Any, error: str | None, traceback: str | None
    ) -> Job | None:
        """Write ``dead_letter``; the updated job, or None (moved on or abandoned)."""
        return await self._write(
            aj,
            DEAD_LETTERED,
            lambda: self._broker.dead_letter(
                aj.lease, reason=reason, error=error, traceback=traceback
            ),
        )

    async def release(self, aj: ActiveJob) -> Job | None:
        """Write ``release`` (shutdown: no attempt charged); the job, or None."""
        return await self._write(aj, RELEASED, lambda: self._broker.release(aj.lease))

    async def _write(
        self, aj: ActiveJob, outcome: Outcome, call: Callable[[], Awaitable[_T]]
    ) -> _T | None:
        self._inflight += 1
        self._idle.clear()
        try:
            while True:
                try:
                    value = await call()
                except _MOVED_ON:
                    _log_moved_on(aj, outcome)
                    self._settle(aj, LEASE_LOST)
                    return None
                except _UNREACHABLE as exc:
                    if await self._backoff(exc):
                        continue
                    self._settle(aj, ABANDONED)
                    return None
                except asyncio.CancelledError:
                    # The owner gave up on this write (a bounded shutdown step): the lease will
                    # expire and the job be recovered; record that it was not written.
                    self._settle(aj, ABANDONED)
                    raise
                except Exception:
                    logger.exception(
                        "worker %s: %s of job %s failed; its lease will expire and it will be "
                        "recovered",
                        self.worker_id,
                        outcome,
                        aj.job.id,
                        extra={"action": outcome, "job_id": aj.job.id, "queue": aj.job.queue},
                    )
                    self._settle(aj, ERROR)
                    return None
                self.circuit.success()
                self._settle(aj, outcome)
                return value
        finally:
            self._inflight -= 1
            self._check_idle()

    # -- outages and shutdown ---------------------------------------------------------------------

    async def _backoff(self, exc: BaseException) -> bool:
        """Wait out a failed write; False if the committer was abandoned meanwhile."""
        if self._abandoned.is_set():
            return False
        delay = self.circuit.failure(exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._abandoned.wait()
        return not self._abandoned.is_set()

    def _check_idle(self) -> None:
        if not self._acks and not self._inflight and not self._writing and not self._borrowed:
            self._idle.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued outcome is written (or dropped); False after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self._idle.is_set()

    def abandon(self) -> None:
        """Stop retrying: outcomes not yet written are settled as ``abandoned`` (lease expiry)."""
        self._abandoned.set()
        acks, self._acks = self._acks, []
        for aj, _ in acks:
            self._settle(aj, ABANDONED)
        self._check_idle()


def _log_moved_on(aj: ActiveJob, action: str) -> None:
    logger.info(
        "job %s moved on (cancelled, deleted or re-delivered) before its %s was stored; dropped",
        aj.job.id,
        action,
        extra={"action": action, "job_id": aj.job.id, "queue": aj.job.queue},
    )


__all__ = ["Committer"]
