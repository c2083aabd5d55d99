"""The worker's shutdown, step by step (the lesson of seed 000): prompt, bounded, loses nothing.

1. stop reserving (the reserve in flight may finish, bounded, so its jobs are released rather
   than left to lease expiry) and stop the reaper;
2. let running jobs finish, up to the grace period, while the heartbeat keeps renewing leases;
3. cancel what still runs and ``release`` those jobs (no attempt charged), shielded, bounded;
4. release the reserved-but-unstarted jobs;
5. flush the committer (acks, retries, dead letters), bounded with the releases;
6. shut the executors down (bounded);
7. store the last progress and log lines (bounded);
8. stop the heartbeat last, then the reaper; the supervisor cancels the remaining loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

from conveyor.worker.leases import SHUTDOWN, ActiveJob, Phase

if TYPE_CHECKING:
    from conveyor.worker.worker import Worker

logger = logging.getLogger("conveyor.worker.worker")  # the worker's log lines, as before the split

# Bounds of the shutdown steps after the grace period (seconds). Together they keep the exit
# within grace + ~5 s even when the broker is down and jobs ignore cancellation.
FETCH_STOP_TIMEOUT_S: Final = 0.5
CANCEL_TIMEOUT_S: Final = 1.0
RELEASE_AND_FLUSH_TIMEOUT_S: Final = 2.0
EXECUTOR_SHUTDOWN_TIMEOUT_S: Final = 1.0
LOOP_STOP_TIMEOUT_S: Final = 0.5


async def shutdown(worker: Worker) -> None:
    """Stop the worker in ordered, bounded steps (see the module docstring)."""
    # 1. Stop reserving. The reserve in flight may finish (bounded) so that the jobs it
    #    returns are tracked and released below instead of being left to lease expiry. The
    #    reaper stops too: recovering other workers' jobs is for live workers.
    held = worker._held
    held.stopping = True
    held.parking = True  # jobs the last reserve returns are parked, then released
    worker._fetcher.stop()
    worker._reaper.stop()
    await _settle_task(worker._loops.get("fetcher"), FETCH_STOP_TIMEOUT_S)

    # 2. Let running jobs finish, up to the grace period, while the heartbeat keeps renewing
    #    their leases. A second signal (stop with grace 0) ends the wait at once.
    if not held.idle():
        logger.info(
            "worker %s stopping: waiting up to %.1f s for %d running job(s)",
            worker.worker_id,
            worker._grace,
            len(held),
            extra={"action": "worker_stopping"},
        )
        held.check_all_done()
        await _first(held.all_done.wait(), worker._immediate.wait(), timeout_s=worker._grace)

    # 3. Cancel what still runs: async runs are cancelled, thread runs abandoned with
    #    ctx.cancelled set, process children terminated (bounded: a run that ignores
    #    cancellation is left behind; its late outcome is refused by the broker). Then give
    #    those jobs back with release (no attempt charged) in shielded cleanup with a
    #    timeout, so another worker starts them at once instead of after lease expiry.
    deadline = time.monotonic() + RELEASE_AND_FLUSH_TIMEOUT_S
    running = [aj for aj in held.active.values() if aj.phase is Phase.RUNNING]
    for aj in running:
        aj.stop_reason = aj.stop_reason or SHUTDOWN
        if aj.task is not None:
            aj.task.cancel()
    tasks = [aj.task for aj in running if aj.task is not None and not aj.task.done()]
    if tasks:
        await asyncio.wait(tasks, timeout=CANCEL_TIMEOUT_S)
    # A run that finished just as it was cancelled is committing its outcome: not released.
    stopped = [aj for aj in running if aj.phase is Phase.RUNNING and aj.stop_reason == SHUTDOWN]
    await release(worker, stopped, deadline)

    # 4. Release the reserved-but-unstarted jobs (the last fetch's parked jobs, and any
    #    whose run had not begun); they never start here.
    unstarted = [aj for aj in held.active.values() if aj.phase is Phase.RESERVED]
    for aj in unstarted:
        aj.stop_reason = aj.stop_reason or SHUTDOWN
        if aj.task is not None:
            aj.task.cancel()
    await release(worker, [aj for aj in unstarted if aj.stop_reason == SHUTDOWN], deadline)

    # 5. Flush the committer: acks in the batch, retries and dead letters in flight. Bounded
    #    with the releases above: with the broker down, the unwritten rest is left to lease
    #    expiry (at-least-once), then runs still going (callbacks, ignored cancellation)
    #    are cancelled for good.
    if not await worker._committer.flush(max(0.05, deadline - time.monotonic())):
        logger.warning(
            "worker %s: %d outcome(s) could not be stored before the shutdown deadline "
            "(broker unreachable?); their leases will expire and the jobs run again",
            worker.worker_id,
            worker._committer.pending,
            extra={"action": "worker_stopping"},
        )
    worker._committer.abandon()
    for task in list(held.tasks):
        task.cancel()
    if held.tasks:
        await asyncio.wait(list(held.tasks), timeout=LOOP_STOP_TIMEOUT_S)

    # 6. Shut down the executors (bounded: threads that ignore ctx.cancelled are abandoned).
    await shutdown_executors(worker)

    # 7. Store the last progress and log lines (bounded).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LOOP_STOP_TIMEOUT_S):
            await worker._reporter.flush()

    # 8. Stop the heartbeat last: leases stayed renewed until every outcome was written.
    # 9. Close the worker's own broker connection: the heartbeat thread closes it as it
    #    ends. The app's broker belongs to the app and stays open. The remaining loops
    #    are cancelled by the caller.
    worker._heartbeat.stop()
    await _settle_task(worker._loops.get("heartbeat"), LOOP_STOP_TIMEOUT_S)
    await _settle_task(worker._loops.get("reaper"), LOOP_STOP_TIMEOUT_S)


async def release(worker: Worker, jobs: list[ActiveJob], deadline: float) -> None:
    """Release ``jobs`` concurrently, shielded from cancellation, until ``deadline``."""
    if not jobs:
        return
    await _shielded(
        asyncio.gather(*(worker._committer.release(aj) for aj in jobs)),
        timeout_s=max(0.05, deadline - time.monotonic()),
    )
    logger.info(
        "worker %s released %d unfinished job(s) back to their queues",
        worker.worker_id,
        len(jobs),
        extra={"action": "release", "queue": ",".join(sorted({aj.job.queue for aj in jobs}))},
    )


async def shutdown_executors(worker: Worker) -> None:
    """Shut every executor down, bounded; failures are logged."""
    if not worker._executors:
        return
    results = await asyncio.gather(
        *(ex.shutdown(EXECUTOR_SHUTDOWN_TIMEOUT_S) for ex in worker._executors.values()),
        return_exceptions=True,
    )
    for kind, result in zip(worker._executors, results, strict=True):
        if isinstance(result, BaseException):
            logger.error(
                "worker %s: the %s executor failed to shut down: %r",
                worker.worker_id,
                kind,
                result,
                extra={"action": "worker_stopping"},
            )


async def _first(*aws: Awaitable[Any], timeout_s: float) -> None:
    """Wait until the first of ``aws`` completes, or ``timeout_s``; cancel the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _settle_task(task: asyncio.Task[None] | None, timeout_s: float) -> None:
    """Wait (bounded) for a loop task to end by itself, then cancel it if it has not."""
    if task is None or task.done():
        return
    await asyncio.wait((task,), timeout=timeout_s)
    if not task.done():
        task.cancel()


async def _shielded(aw: Awaitable[Any], *, timeout_s: float) -> None:
    """Run cleanup that the caller's cancellation cannot interrupt, bounded by ``timeout_s``."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait((task,), timeout=timeout_s)
    except asyncio.CancelledError:
        # Cancelled ourselves: still give the cleanup its bounded time, then re-raise.
        await asyncio.wait((task,), timeout=timeout_s)
        raise
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled():
            task.exception()  # retrieved: failures were logged where they happened


__all__ = ["shutdown", "shutdown_executors"]
