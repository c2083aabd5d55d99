"""Module-level tasks for the executor tests; spawned process children import this module."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from conveyor.client import Conveyor
from conveyor.context import JobContext

app = Conveyor("memory://")


# -- async ------------------------------------------------------------------------------------


@app.task(executor="async")
async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


@app.task(executor="async")
async def async_sleep(ctx: JobContext, seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    finally:
        ctx.log(f"cancelled={ctx.cancelled}")
    return "slept"


@app.task(executor="async")
async def async_raise_timeout() -> None:
    async with asyncio.timeout(0.01):
        await asyncio.sleep(10)


@app.task(executor="async")
async def async_logs(ctx: JobContext, message: str) -> str:
    logging.getLogger("x").info("hello %s", message)
    logging.getLogger("conveyor.worker.test").warning("own record, never captured")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x.y").exception("failed")
    return ctx.job_id


# -- thread -----------------------------------------------------------------------------------


@app.task(executor="thread")
def thread_add(a: int, b: int = 0) -> dict[str, Any]:
    return {"sum": a + b, "thread": threading.current_thread().name}


@app.task(executor="thread")
def thread_raise(message: str) -> None:
    raise KeyError(message)


@app.task(executor="thread")
def thread_wait_cancel(ctx: JobContext, seen: list[bool], limit_s: float) -> None:
    """Blocks until cancelled (or ``limit_s``), then records whether it saw the cancellation."""
    seen.append(ctx.wait_cancelled(limit_s))


@app.task(executor="thread")
def thread_block(event: threading.Event, limit_s: float) -> None:
    """Ignores cancellation: blocks on an event the test controls."""
    event.wait(limit_s)


@app.task(executor="thread")
def thread_logs(ctx: JobContext, message: str) -> str:
    logging.getLogger("x").info("thread says %s", message)
    return ctx.job_id


@app.task(executor="thread")
def thread_exit() -> None:
    raise SystemExit(4)


# -- process ----------------------------------------------------------------------------------


@app.task(executor="process")
def proc_pid(ctx: JobContext, value: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "value": value, "job": ctx.job_id}


@app.task(executor="process")
async def proc_async(x: int) -> int:
    await asyncio.sleep(0.01)
    return x * 2


@app.task(executor="process")
def proc_raise(message: str) -> None:
    raise ValueError(message)


@app.task(executor="process")
def proc_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@app.task(executor="process")
def proc_exit(code: int) -> None:
    time.sleep(0.05)
    os._exit(code)


@app.task(executor="process")
def proc_report(ctx: JobContext) -> str:
    """Interleaves progress, ctx.log, print, stderr and logging; the parent must see this order."""
    ctx.progress(10, "starting")
    print("line one")
    ctx.log("ctx log")
    print("partial ", end="")
    print("line two")
    print("to stderr", file=sys.stderr)
    logging.getLogger("child.logger").info("logged %d", 42)
    ctx.progress(100)
    print("no newline at the end", end="")
    return "reported"


@app.task(executor="process")
def proc_stubborn(seconds: float) -> None:
    """Ignores SIGTERM and busy-loops, so only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@app.task(executor="process")
def proc_unencodable() -> object:
    return {1, 2, 3}


class Nested:
    """A class holding a function, to check qualname resolution in the child."""

    @staticmethod
    def double(x: int) -> int:
        return 2 * x


def plain_function(x: int) -> int:
    """Not decorated: the child finds a plain function (as in conveyor.demo_tasks)."""
    return x + 1


nested_double = app.task(name="tests.nested_double", executor="process")(Nested.double)
plain_task = app.task(name="tests.plain", executor="process")(plain_function)
