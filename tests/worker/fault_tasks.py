"""Tasks of the fault tests' worker processes: every run appends to an outside ledger.

The ledger is a file opened with O_APPEND and written with single ``os.write`` calls, so lines
are whole and survive a SIGKILL of the writer (the data is in the kernel once written). A line:
``job_id attempt pid event unix_time`` with event ``start`` or ``end``.
"""

from __future__ import annotations

import asyncio
import os
import time

from conveyor import Conveyor, JobContext

app = Conveyor(os.environ.get("CONVEYOR_URL", "memory://"))
_fd: int | None = None


def ledger(job_id: str, attempt: int, event: str) -> None:
    """Append one line to the ledger named by $CONVEYOR_TEST_LEDGER."""
    global _fd
    if _fd is None:
        path = os.environ["CONVEYOR_TEST_LEDGER"]
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, f"{job_id} {attempt} {os.getpid()} {event} {time.time():.6f}\n".encode())


@app.task(name="fault.sleep")
async def sleep(ctx: JobContext, seconds: float) -> str:
    """Sleep ``seconds`` times $CONVEYOR_TEST_SLEEP_SCALE, recording start and end."""
    ledger(ctx.job_id, ctx.attempt, "start")
    await asyncio.sleep(seconds * float(os.environ.get("CONVEYOR_TEST_SLEEP_SCALE", "1")))
    ledger(ctx.job_id, ctx.attempt, "end")
    return "done"
