"""The chaos workers' tasks: every run is recorded in the ledger at ``$CONVEYOR_CHAOS_LEDGER``.

``chaos.sleep`` records its start, sleeps, records its end (``ok``, or ``cancelled`` when the
worker stops it); its ``on_success`` callback ``chaos.committed`` runs only after the broker has
accepted the ack, so its ledger line is the broker-side proof of one commit.

The others exercise one path each (all but ``chaos.doomed`` commit through ``chaos.committed``):

* ``chaos.flaky``: fails its first attempt (retried after 0.2 s), then behaves like sleep.
* ``chaos.doomed``: always fails, one attempt allowed: it ends in dead letters. Its runs go to
  the ``doomed`` subdirectory of the ledger (the checker would count them as lost otherwise).
* ``chaos.proc_sleep`` (process executor, queue ``chaos-process``): sleep in a child process;
  the start record's ``pid`` is the child's, which is how a driver finds the child to kill.
* ``chaos.proc_oom`` (process executor): sets ``RLIMIT_AS`` and allocates until the limit is
  hit, then dies the way a process over its memory limit does (SIGKILL from the kernel's OOM
  killer, emulated: a MemoryError alone would let the child carry on).
* ``chaos.stubborn_async`` / ``_thread`` / ``_proc``: ignore cancellation (swallow
  CancelledError / ``time.sleep`` / a CPU loop) until their time is up.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

from conveyor import Conveyor, JobContext
from conveyor.retry import RetryPolicy
from conveyor.testing.ledger import Ledger

#: Environment variables read by the tasks and the worker program.
LEDGER_ENV = "CONVEYOR_CHAOS_LEDGER"
SCALE_ENV = "CONVEYOR_CHAOS_SLEEP_SCALE"
SLEEP = "chaos.sleep"
COMMITTED = "chaos.committed"
FLAKY = "chaos.flaky"
DOOMED = "chaos.doomed"
PROC_SLEEP = "chaos.proc_sleep"
PROC_OOM = "chaos.proc_oom"
STUBBORN_ASYNC = "chaos.stubborn_async"
STUBBORN_THREAD = "chaos.stubborn_thread"
STUBBORN_PROC = "chaos.stubborn_proc"
#: The queue of the process-executor tasks (a worker serves it only when asked to).
PROCESS_QUEUE = "chaos-process"
#: Queues of the stubborn async and thread tasks: a queue whose tasks use one executor kind is
#: not held back by another kind's full slots (a worker reserves for a queue only while every
#: kind its tasks use has room).
STUBBORN_ASYNC_QUEUE = "chaos-stubborn-async"
STUBBORN_THREAD_QUEUE = "chaos-stubborn-thread"
#: Subdirectory of the ledger where ``chaos.doomed`` records its runs.
DOOMED_DIR = "doomed"

app = Conveyor(os.environ.get("CONVEYOR_URL", "memory://"))
_ledger: Ledger | None = None
_doomed: Ledger | None = None
_QUICK_RETRY = RetryPolicy.fixed(0.2, max_attempts=5)


def ledger() -> Ledger:
    """The ledger of this process (opened on first use, so importing the module writes nothing)."""
    global _ledger
    if _ledger is None:
        _ledger = Ledger(os.environ[LEDGER_ENV])
    return _ledger


def _scaled(seconds: float) -> float:
    return seconds * float(os.environ.get(SCALE_ENV, "1"))


@app.task(name=SLEEP, on_success=COMMITTED)
async def sleep(ctx: JobContext, seconds: float) -> str:
    """Sleep ``seconds`` times ``$CONVEYOR_CHAOS_SLEEP_SCALE``, recording start and end."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    try:
        await asyncio.sleep(_scaled(seconds))
    except asyncio.CancelledError:
        # Stopped by a shutdown or a revoked lease: an execution, but not a successful one.
        book.record_end(ctx.job_id, ctx.attempt, "cancelled")
        raise
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(name=COMMITTED)
async def committed(outcome: dict[str, Any]) -> None:
    """on_success of the chaos tasks: the broker accepted this attempt's completion."""
    ledger().record_committed(outcome["job_id"], int(outcome["attempts"]))


@app.task(name=FLAKY, on_success=COMMITTED, retry=_QUICK_RETRY)
async def flaky(ctx: JobContext, seconds: float) -> str:
    """Fail the first attempt (so the worker stores a retry), then sleep like ``chaos.sleep``."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    if ctx.attempt == 1:
        book.record_end(ctx.job_id, ctx.attempt, "error")
        raise RuntimeError("chaos.flaky fails its first attempt")
    await asyncio.sleep(_scaled(seconds))
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(name=DOOMED, max_attempts=1)
async def doomed(ctx: JobContext) -> None:
    """Always fail with one attempt allowed: the worker dead-letters it."""
    global _doomed
    if _doomed is None:
        _doomed = Ledger(Path(os.environ[LEDGER_ENV]) / DOOMED_DIR)
    _doomed.record_start(ctx.job_id, ctx.attempt)
    raise RuntimeError("chaos.doomed always fails")


@app.task(
    name=PROC_SLEEP,
    executor="process",
    queue=PROCESS_QUEUE,
    on_success=COMMITTED,
    retry=_QUICK_RETRY,
)
def proc_sleep(ctx: JobContext, seconds: float, retry_seconds: float | None = None) -> str:
    """Sleep in a process child, recording start (with the child's pid) and end.

    A retry sleeps ``retry_seconds`` instead, if given (a killed job need not wait as long).
    """
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    if ctx.attempt > 1 and retry_seconds is not None:
        seconds = retry_seconds
    time.sleep(_scaled(seconds))
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(
    name=PROC_OOM,
    executor="process",
    queue=PROCESS_QUEUE,
    on_success=COMMITTED,
    retry=RetryPolicy.fixed(0.2, max_attempts=2),
)
def proc_oom(ctx: JobContext, limit_mb: int) -> str:
    """Exceed a ``limit_mb`` address-space limit on attempt 1 and die as the OOM killer does.

    Later attempts succeed at once (so the retry shows the job itself is fine).
    """
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    if ctx.attempt > 1:
        book.record_end(ctx.job_id, ctx.attempt)
        return "done"
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = _address_space_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (used + limit_mb * 2**20, hard))
    hoard = []
    try:
        while True:
            hoard.append(bytearray(8 * 2**20))  # counts against RLIMIT_AS when mapped
    except MemoryError:
        book.record_end(ctx.job_id, ctx.attempt, "oom")
        # A cgroup or the OOM killer ends such a process with SIGKILL, not an exception.
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10.0)
    raise AssertionError("unreachable")


def _address_space_bytes() -> int:
    """The current virtual size of this process (``/proc/self/statm``, first field, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


@app.task(name=STUBBORN_ASYNC, queue=STUBBORN_ASYNC_QUEUE, on_success=COMMITTED)
async def stubborn_async(ctx: JobContext, seconds: float) -> str:
    """Ignore every cancellation until ``seconds`` (scaled) have passed."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    deadline = time.monotonic() + _scaled(seconds)
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.sleep(left)
        except asyncio.CancelledError:
            continue  # deliberately swallowed: the misbehaving job under test
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(
    name=STUBBORN_THREAD, executor="thread", queue=STUBBORN_THREAD_QUEUE, on_success=COMMITTED
)
def stubborn_thread(ctx: JobContext, seconds: float) -> str:
    """Block in ``time.sleep`` without ever looking at ``ctx.cancelled``."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    time.sleep(_scaled(seconds))
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(name=STUBBORN_PROC, executor="process", queue=PROCESS_QUEUE, on_success=COMMITTED)
def stubborn_proc(ctx: JobContext, seconds: float) -> str:
    """Spin the CPU in a process child until ``seconds`` (scaled) have passed."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    deadline = time.monotonic() + _scaled(seconds)
    n = 0
    while time.monotonic() < deadline:
        n += 1
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"
