"""Helpers shared by the worker tests (imported by plain name: tests/worker is not a package)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from conveyor.client import Conveyor
from conveyor.job import Job, JobState
from conveyor.worker import Worker

STOP_TIMEOUT_S = 20.0


async def eventually(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout_s: float = 5.0,
    what: str = "the condition",
) -> Any:
    """Poll ``predicate`` (sync or async) every 10 ms until it is truthy; its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(app: Conveyor, **options: Any) -> AsyncIterator[Worker]:
    """A started worker, stopped (bounded) at the end of the block."""
    options.setdefault("lease_s", 5.0)
    options.setdefault("heartbeat_s", 0.1)
    options.setdefault("scan_interval_s", 0.2)
    options.setdefault("grace_period_s", 5.0)
    worker = Worker(app, **options)
    await worker.start()
    try:
        yield worker
    finally:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await worker.stop()


async def finished(app: Conveyor, ids: Sequence[str], timeout_s: float = 10.0) -> list[Job]:
    """Wait for every job to finish; their records, in order.

    One at a time: each wait follows the broker's event stream on a connection of its own.
    """
    async with asyncio.timeout(timeout_s):
        return [await app.wait(i, timeout_s=timeout_s) for i in ids]


async def state_of(app: Conveyor, job_id: str) -> JobState:
    """The job's current state."""
    job = await app.get_job(job_id)
    assert job is not None, f"job {job_id} is gone"
    return job.state
