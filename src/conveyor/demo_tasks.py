"""The demo's example tasks, in an importable module so process-executor children can load them.

The functions are registered on an app by :func:`make_app` rather than decorated at import time:
a spawned child imports this module to find ``crunch`` and must not build an app (and its broker)
as a side effect, and the demo wants its own broker URL and delays.
"""

from __future__ import annotations

import asyncio
import time

from conveyor.client import Conveyor
from conveyor.context import JobContext
from conveyor.retry import RetryPolicy

# Task names: the demo enqueues by name, as any producer that does not import task code would.
GREET = "demo.greet"
FLAKY_FETCH = "demo.flaky_fetch"
CHARGE_INVOICE = "demo.charge_invoice"
CRUNCH = "demo.crunch"
BUILD_REPORT = "demo.build_report"
RESIZE_IMAGE = "demo.resize_image"


async def greet(ctx: JobContext, name: str) -> str:
    """A quick coroutine job: say hello after a short pause."""
    ctx.progress(50, f"greeting {name}")
    await asyncio.sleep(0.3)
    return f"hello, {name}"


async def flaky_fetch(ctx: JobContext, url: str) -> str:
    """Fails on its first two attempts (an upstream that is warming up), then succeeds."""
    if ctx.attempt < 3:
        ctx.log(f"attempt {ctx.attempt}: {url} timed out")
        raise ConnectionError(f"{url} timed out (attempt {ctx.attempt})")
    ctx.log(f"attempt {ctx.attempt}: {url} answered")
    return f"fetched {url} on attempt {ctx.attempt}"


async def charge_invoice(ctx: JobContext, invoice: int) -> None:
    """Always fails: the invoice has no customer, so it ends in dead letters."""
    raise ValueError(f"invoice {invoice} has no customer on file")


def crunch(ctx: JobContext, n: int, chunks: int = 5, pause_s: float = 0.15) -> int:
    """CPU work in a spawned process: sums squares in chunks, reporting progress and printing.

    What it prints goes to the job's log (the process executor captures the child's output).
    """
    total = 0
    size = n // chunks
    for i in range(chunks):
        total += sum(k * k for k in range(i * size, (i + 1) * size))
        print(f"chunk {i + 1}/{chunks}: running total {total}", flush=True)
        ctx.progress((i + 1) * 100 // chunks, f"chunk {i + 1}/{chunks}")
        time.sleep(pause_s)  # a real job would not sleep; this keeps the bar visible
    return total


async def build_report(ctx: JobContext, steps: int, step_s: float) -> str:
    """A long coroutine job (the demo cancels it while it runs)."""
    for i in range(steps):
        ctx.progress(i * 100 // steps, f"section {i + 1}/{steps}")
        await asyncio.sleep(step_s)
    return "report done"


def resize_image(ctx: JobContext, image: str, steps: int = 4, step_s: float = 0.2) -> str:
    """Blocking work in the thread pool: it checks ``ctx.cancelled`` between steps."""
    for i in range(steps):
        if ctx.cancelled:
            return "cancelled"
        ctx.progress((i + 1) * 100 // steps, f"pass {i + 1}/{steps}")
        time.sleep(step_s)
    return f"{image} resized"


def make_app(url: str, *, fast: bool = False) -> Conveyor:
    """An app on ``url`` with the demo's tasks registered (shorter retry delays when ``fast``)."""
    app = Conveyor(url)
    backoff = 0.2 if fast else 0.5
    app.task(name=GREET, priority="normal")(greet)
    app.task(
        name=FLAKY_FETCH,
        # exponential backoff: backoff, then 2 * backoff; no jitter so the demo is repeatable
        retry=RetryPolicy.exponential(min_delay_s=backoff, base=2.0, max_attempts=3, jitter=0.0),
    )(flaky_fetch)
    app.task(
        name=CHARGE_INVOICE,
        retry=RetryPolicy.fixed(delay_s=backoff, max_attempts=2, jitter=0.0),
    )(charge_invoice)
    app.task(name=CRUNCH, executor="process", timeout_s=60)(crunch)
    app.task(name=BUILD_REPORT)(build_report)
    app.task(name=RESIZE_IMAGE, executor="thread")(resize_image)
    return app
