"""Tasks of the poison, timeout and flood scenarios (P1-P6, D4), on :data:`.tasks.app`.

These jobs never succeed (or are not producer-acknowledged), so they must not appear as ledger
``start``/``end`` records, which the checker would count as lost or unexpected executions. They
write ``p_start``/``p_end`` records instead, to the same directory, one JSONL line per
``os.write`` on an ``O_APPEND`` file, so a line survives the process killing itself.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import sys
import time
from typing import Any

from conveyor import JobContext
from conveyor.testing.chaos.tasks import LEDGER_ENV, app

P_START = "p_start"
P_END = "p_end"
DIE = "chaos.die"
FAIL = "chaos.fail"
HANG_ASYNC = "chaos.hang_async"
HANG_THREAD = "chaos.hang_thread"
HANG_PROCESS = "chaos.hang_process"
FLOOD = "chaos.flood"
ECHO = "chaos.echo"
MODULES = "chaos.modules"
#: Modules that can turn bytes into objects; none may be loaded by a worker running plain jobs.
UNPICKLERS = ("pickle", "_pickle", "cloudpickle", "dill", "shelve", "jsonpickle")


def note(kind: str, job_id: str, attempt: int, **fields: Any) -> None:
    """Append one record of ``kind`` for ``job_id`` to this process's poison ledger file."""
    directory = os.environ[LEDGER_ENV]
    os.makedirs(directory, exist_ok=True)
    record = {"k": kind, "id": job_id, "attempt": attempt, "pid": os.getpid(), "t": time.time()}
    record.update(fields)
    fd = os.open(
        os.path.join(directory, f"poison-{os.getpid()}.jsonl"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    try:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)


#: The process tasks' own queue: a worker reserves from a queue only as many jobs as the
#: fullest executor *of the tasks registered on it* could start, so children dying and
#: respawning would stall every async job of a queue that also has a process task (measured in
#: P1: ~10/s instead of ~140/s while the poison job killed its children).
POISON_QUEUE = "chaos-poison"


@app.task(name=DIE, executor="process", queue=POISON_QUEUE)
def die(ctx: JobContext, how: str = "exit") -> None:
    """Kill the process running this job: ``exit`` is ``os._exit(1)``, ``segv`` a NULL read."""
    note(P_START, ctx.job_id, ctx.attempt, how=how)
    if how == "segv":
        ctypes.string_at(0)  # dereferences NULL: SIGSEGV
    os._exit(1)


@app.task(name=FAIL)
async def fail(ctx: JobContext) -> None:
    """Raise on every attempt (the retry schedule is the job's; its starts are recorded)."""
    note(P_START, ctx.job_id, ctx.attempt)
    raise RuntimeError(f"chaos.fail attempt {ctx.attempt}")


@app.task(name=HANG_ASYNC)
async def hang_async(ctx: JobContext, seconds: float) -> str:
    """Sleep ``seconds`` on the loop (cancellable); records start and how it ended."""
    note(P_START, ctx.job_id, ctx.attempt)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        note(P_END, ctx.job_id, ctx.attempt, outcome="cancelled")
        raise
    note(P_END, ctx.job_id, ctx.attempt, outcome="ok")
    return "done"


@app.task(name=HANG_THREAD, executor="thread")
def hang_thread(ctx: JobContext, seconds: float) -> str:
    """Block a pool thread ``seconds`` (it cannot be killed: it is abandoned on timeout)."""
    note(P_START, ctx.job_id, ctx.attempt)
    time.sleep(seconds)
    note(P_END, ctx.job_id, ctx.attempt, outcome="ok")
    return "done"


@app.task(name=HANG_PROCESS, executor="process", queue=POISON_QUEUE)
def hang_process(ctx: JobContext, seconds: float) -> str:
    """Block a process child ``seconds`` (the worker kills the child on timeout)."""
    note(P_START, ctx.job_id, ctx.attempt)
    time.sleep(seconds)
    note(P_END, ctx.job_id, ctx.attempt, outcome="ok")
    return "done"


@app.task(name=FLOOD)
async def flood(ctx: JobContext, lines: int) -> int:
    """Log ``lines`` lines and report progress on each, yielding to the loop every 1,000."""
    note(P_START, ctx.job_id, ctx.attempt, pid_rss=_rss_kib())
    for i in range(lines):
        ctx.log(f"flood line {i} " + "x" * 64)
        ctx.progress(100 * i // lines)
        if i % 1000 == 999:
            await asyncio.sleep(0)
    note(P_END, ctx.job_id, ctx.attempt, outcome="ok", pid_rss=_rss_kib())
    return lines


@app.task(name=ECHO)
async def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Return the arguments exactly as received (payload-as-data checks)."""
    return {"args": list(args), "kwargs": kwargs}


@app.task(name=MODULES)
async def modules(names: list[str]) -> list[str]:
    """Which of ``names`` (module names) are loaded in this worker process."""
    return [name for name in names if name in sys.modules]


def _rss_kib() -> int:
    """Resident set size of this process in KiB (VmRSS of /proc/self/status), 0 if unknown."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


__all__ = [
    "DIE",
    "ECHO",
    "FAIL",
    "FLOOD",
    "HANG_ASYNC",
    "HANG_PROCESS",
    "HANG_THREAD",
    "MODULES",
    "POISON_QUEUE",
    "P_END",
    "P_START",
    "UNPICKLERS",
    "note",
]
