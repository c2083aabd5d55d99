"""Chaos tasks that misbehave on purpose: block the loop, hold the GIL, break the fetch loop.

Registered on :data:`conveyor.testing.chaos.tasks.app` (importing this module is enough; the
chaos worker program does), recording in the same ledger as ``chaos.sleep``:

* ``chaos.block``: an ``async def`` that calls ``time.sleep`` (the loop stops for that long).
* ``chaos.spin``: a pure-Python CPU loop on the thread executor (holds the GIL, yielding it only
  at the interpreter's switch interval). It has a queue of its own, :data:`SPIN_QUEUE`, so that
  the thread executor's slots never cap how many ``default`` jobs a worker reserves at once.
* ``chaos.stall_fetcher`` / ``chaos.kill_fetcher`` (also on :data:`cli_app`): test-only fault
  injection from inside the worker process, with no production hook: the first makes the
  worker's fetch loop hang in its next round (alive but stuck), the second cancels the fetch
  loop task (dead while the rest of the worker runs on): the two ways a worker can be
  "connected but not consuming".
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

from conveyor import Conveyor, JobContext
from conveyor.testing.chaos.tasks import COMMITTED, SLEEP, app, committed, ledger, sleep

BLOCK = "chaos.block"
SPIN = "chaos.spin"
STALL_FETCHER = "chaos.stall_fetcher"
KILL_FETCHER = "chaos.kill_fetcher"
SPIN_QUEUE = "chaos-cpu"

#: The app the scenarios run with the real ``conveyor worker`` command: only async tasks
#: (``chaos.sleep`` and its commit callback, the fetch-loop faults), so the command starts no
#: process pool (``tasks.app`` has process tasks, and that pool takes seconds to start).
cli_app = Conveyor(os.environ.get("CONVEYOR_URL", "memory://"))
cli_app.task(name=SLEEP, on_success=COMMITTED)(sleep.fn)
cli_app.task(name=COMMITTED)(committed.fn)

__all__ = [
    "BLOCK",
    "KILL_FETCHER",
    "SPIN",
    "SPIN_QUEUE",
    "STALL_FETCHER",
    "app",
    "block",
    "cli_app",
    "kill_fetcher",
    "spin",
    "stall_fetcher",
]


@app.task(name=BLOCK, on_success=COMMITTED)
async def block(ctx: JobContext, seconds: float) -> str:
    """Block the worker's event loop for ``seconds`` (``time.sleep`` in a coroutine)."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    time.sleep(seconds)  # noqa: ASYNC251  # the fault under test: a job blocking the loop
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(name=SPIN, queue=SPIN_QUEUE, executor="thread", on_success=COMMITTED)
def spin(ctx: JobContext, seconds: float) -> int:
    """Run a pure-Python loop for ``seconds`` on the thread executor (holds the GIL)."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(10_000):  # pure bytecode: no call that releases the GIL
            n += 1
    book.record_end(ctx.job_id, ctx.attempt)
    return n


def _this_worker() -> Any:
    """The Worker running in this process (found by the garbage collector, test-only)."""
    from conveyor.worker.worker import Worker

    found = [o for o in gc.get_objects() if isinstance(o, Worker)]
    if len(found) != 1:
        raise RuntimeError(f"expected one Worker in this process, found {len(found)}")
    return found[0]


async def _hang() -> tuple[bool, bool, list[str]]:
    await asyncio.Event().wait()  # never set: the round never ends
    raise AssertionError("unreachable")


@app.task(name=STALL_FETCHER)
@cli_app.task(name=STALL_FETCHER)
async def stall_fetcher(ctx: JobContext) -> None:
    """Make this worker's fetch loop hang in its next round (alive, but no progress)."""
    ledger().record_start(ctx.job_id, ctx.attempt)
    fetcher = _this_worker()._fetcher
    vars(fetcher)["_round"] = _hang  # shadows the method on this one instance


@app.task(name=KILL_FETCHER)
@cli_app.task(name=KILL_FETCHER)
async def kill_fetcher(ctx: JobContext) -> None:
    """Cancel this worker's fetch loop task (dead, while the worker and its broker live on)."""
    ledger().record_start(ctx.job_id, ctx.attempt)
    _this_worker()._loops["fetcher"].cancel()
