"""The chaos workers' tasks: every run is recorded in the ledger at ``$CONVEYOR_CHAOS_LEDGER``.

``chaos.sleep`` records its start, sleeps, records its end (``ok``, or ``cancelled`` when the
worker stops it); its ``on_success`` callback ``chaos.committed`` runs only after the broker has
accepted the ack, so its ledger line is the broker-side proof of one commit.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from conveyor import Conveyor, JobContext
from conveyor.testing.ledger import Ledger

#: Environment variables read by the tasks and the worker program.
LEDGER_ENV = "CONVEYOR_CHAOS_LEDGER"
SCALE_ENV = "CONVEYOR_CHAOS_SLEEP_SCALE"
SLEEP = "chaos.sleep"
COMMITTED = "chaos.committed"

app = Conveyor(os.environ.get("CONVEYOR_URL", "memory://"))
_ledger: Ledger | None = None


def ledger() -> Ledger:
    """The ledger of this process (opened on first use, so importing the module writes nothing)."""
    global _ledger
    if _ledger is None:
        _ledger = Ledger(os.environ[LEDGER_ENV])
    return _ledger


@app.task(name=SLEEP, on_success=COMMITTED)
async def sleep(ctx: JobContext, seconds: float) -> str:
    """Sleep ``seconds`` times ``$CONVEYOR_CHAOS_SLEEP_SCALE``, recording start and end."""
    book = ledger()
    book.record_start(ctx.job_id, ctx.attempt)
    try:
        await asyncio.sleep(seconds * float(os.environ.get(SCALE_ENV, "1")))
    except asyncio.CancelledError:
        # Stopped by a shutdown or a revoked lease: an execution, but not a successful one.
        book.record_end(ctx.job_id, ctx.attempt, "cancelled")
        raise
    book.record_end(ctx.job_id, ctx.attempt)
    return "done"


@app.task(name=COMMITTED)
async def committed(outcome: dict[str, Any]) -> None:
    """on_success of ``chaos.sleep``: the broker accepted this attempt's completion."""
    ledger().record_committed(outcome["job_id"], int(outcome["attempts"]))
