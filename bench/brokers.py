"""Broker throughput: enqueue one by one, enqueue in batches, and reserve+ack in batches.

Per broker, in one process and on one event loop:

* enqueue one by one: ``enqueue([job])`` per job;
* enqueue in batches of 1,000: ``enqueue(batch)``;
* reserve+ack in batches of 100: ``reserve(queue, 100)`` then ``ack_many`` of what came back,
  until every job of the batched phase is done.

Job records are built before the clock starts (building them is the caller's cost, not the
broker's). Redis runs on a private ``redis-server`` started here unless ``--redis-url`` is given
(then keys go under a random prefix that is deleted afterwards); SQLite uses a temporary
directory. A broker that cannot be opened (not installed, not built yet) gets a row saying why,
and the others still run.

    .venv/bin/python bench/brokers.py [--jobs 20000] [--brokers memory,sqlite,redis]
                                      [--redis-url redis://host:port/db] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from conveyor.brokers import open_broker
from conveyor.brokers.base import Broker
from conveyor.job import Job, new_job_id

ENQUEUE_BATCH = 1_000
RESERVE_BATCH = 100
LEASE_S = 60.0
TARGETS = {"redis": (None, 50_000.0, 20_000.0)}  # the figures the Redis broker must reach


@dataclass
class Row:
    """One broker's figures (jobs per second), or why it could not run."""

    broker: str
    single: float | None = None
    batched: float | None = None
    reserve_ack: float | None = None
    note: str = ""
    errors: list[str] = field(default_factory=list)


def make_jobs(n: int, queue: str) -> list[Job]:
    """``n`` small jobs: a realistic payload of a few scalars and a short string."""
    return [
        Job(id=new_job_id(), task="bench.noop", queue=queue, args=[i, "payload-0123456789"],
            kwargs={"n": i, "flag": True})
        for i in range(n)
    ]  # fmt: skip


async def enqueue_single(broker: Broker, jobs: list[Job]) -> float:
    started = time.perf_counter()
    for job in jobs:
        await broker.enqueue([job])
    return len(jobs) / (time.perf_counter() - started)


async def enqueue_batched(broker: Broker, jobs: list[Job]) -> float:
    started = time.perf_counter()
    for i in range(0, len(jobs), ENQUEUE_BATCH):
        await broker.enqueue(jobs[i : i + ENQUEUE_BATCH])
    return len(jobs) / (time.perf_counter() - started)


async def reserve_ack(broker: Broker, queue: str, n: int) -> float:
    done = 0
    started = time.perf_counter()
    while done < n:
        jobs = await broker.reserve(queue, RESERVE_BATCH, lease_s=LEASE_S, worker_id="bench")
        if not jobs:
            raise RuntimeError(f"queue {queue!r} ran dry after {done} of {n} jobs")
        acked = await broker.ack_many([(job.lease, None) for job in jobs])
        done += sum(acked)
    return n / (time.perf_counter() - started)


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """A Redis URL to use and broker options: a private server, or the given URL + a prefix."""
    if given:
        yield given, {"prefix": f"conveyor-bench-{secrets.token_hex(4)}"}
        return
    from conveyor.testing.redis_server import RedisServer

    with RedisServer() as server:
        yield server.url, {}


async def drop_prefix(url: str, prefix: str) -> None:
    """Delete the keys a run against a shared Redis created (SCAN is fine here, outside Lua)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match=f"{{{prefix}*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def opened(kind: str, args: argparse.Namespace) -> AsyncIterator[Broker]:
    """A connected broker of ``kind`` with its own fresh store."""
    if kind == "memory":
        broker = open_broker("memory://")
        async with broker:
            yield broker
    elif kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
            broker = open_broker(f"sqlite:///{Path(tmp) / 'bench.db'}")
            async with broker:
                yield broker
    elif kind == "redis":
        with redis_url(args.redis_url) as (url, options):
            broker = open_broker(url, **options)
            try:
                async with broker:
                    yield broker
            finally:
                if "prefix" in options:
                    with contextlib.suppress(Exception):  # never mask the run's own error
                        await drop_prefix(url, options["prefix"])
    else:
        raise ValueError(f"unknown broker {kind!r}; use memory, sqlite or redis")


async def run_one(kind: str, args: argparse.Namespace) -> Row:
    """All three phases on a fresh broker, ``args.runs`` times; the best figure of each counts."""
    row = Row(kind)
    n = args.jobs

    def best(old: float | None, new: float) -> float:
        return new if old is None else max(old, new)

    for run in range(args.runs):
        try:
            async with opened(kind, args) as broker:
                single = await enqueue_single(broker, make_jobs(n, f"single-{run}"))
                row.single = best(row.single, single)
                batched = await enqueue_batched(broker, make_jobs(n, f"batched-{run}"))
                row.batched = best(row.batched, batched)
                rate = await reserve_ack(broker, f"batched-{run}", n)
                row.reserve_ack = best(row.reserve_ack, rate)
        except Exception as exc:  # a broker that cannot run gets a row saying why
            row.note = f"{type(exc).__name__}: {exc}"[:120]
            if args.verbose:
                row.errors.append(traceback.format_exc())
            break
    return row


def fmt(value: float | None, target: float | None) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}"
    if target is not None:
        text += " ✓" if value >= target else f" ✗ (< {target:,.0f})"
    return text


def render(rows: list[Row], jobs: int, console: Console) -> None:
    table = Table(title=f"conveyor brokers: {jobs:,} jobs, one process, jobs/s (higher is better)")
    table.add_column("broker")
    table.add_column("enqueue 1 by 1", justify="right")
    table.add_column(f"enqueue, batches of {ENQUEUE_BATCH:,}", justify="right")
    table.add_column(f"reserve+ack_many, batches of {RESERVE_BATCH}", justify="right")
    table.add_column("note")
    for row in rows:
        targets = TARGETS.get(row.broker, (None, None, None))
        table.add_row(
            row.broker,
            fmt(row.single, targets[0]),
            fmt(row.batched, targets[1]),
            fmt(row.reserve_ack, targets[2]),
            row.note,
        )
    console.print(table)
    for row in rows:
        for error in row.errors:
            console.print(f"[bold]{row.broker}[/bold]\n{error}")


def main(argv: list[str] | None = None, run: Callable[..., Any] = asyncio.run) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per phase (default 20000)")
    parser.add_argument("--brokers", default="memory,sqlite,redis", help="comma-separated kinds")
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    parser.add_argument("--runs", type=int, default=1, help="repeat and keep the best figures")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    if args.jobs < RESERVE_BATCH:
        parser.error(f"--jobs must be at least {RESERVE_BATCH}")
    console = Console()
    rows = []
    for kind in [k.strip() for k in args.brokers.split(",") if k.strip()]:
        with console.status(f"benchmarking {kind} ..."):
            rows.append(run(run_one(kind, args)))
    render(rows, args.jobs, console)


if __name__ == "__main__":
    main()
