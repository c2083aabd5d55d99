"""The app the schemathesis run's server works for: the task name the OpenAPI examples use.

``app.tasks.send`` (the ``task`` example in the document) succeeds when its first argument is
truthy and fails for good otherwise, so generated jobs end completed, failed (dead letters to
retry and redrive) or stopped, and the stateful phase meets every state. Other generated task
names are unknown to the worker, which fails them too.
"""

from __future__ import annotations

import os
from typing import Any

from conveyor.client import Conveyor
from conveyor.context import JobContext

app = Conveyor(os.environ.get("CONVEYOR_URL", "memory://"))


@app.task(name="app.tasks.send", max_attempts=1, timeout_s=5)
async def send(ctx: JobContext, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Log a line, then succeed or fail depending on the first argument."""
    ctx.log(f"send {len(args)} args, {len(kwargs)} kwargs")
    if not args or not args[0]:
        raise ValueError("nothing to send (a generated failure: a dead letter to redrive)")
    return {"sent": len(args), "keys": sorted(kwargs)}
