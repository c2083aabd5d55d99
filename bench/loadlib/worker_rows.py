"""T1, T2, T4 and T5 of reliability plan 7.7: one worker process against each broker.

T1 (drain rate) and T4 (enqueue->start latency) reuse bench/worker.py's ``drain`` and
``latency``; T2 and T5 are measured here.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import brokers as broker_bench
from bench import worker as worker_bench
from bench.loadlib.common import LagMonitor, Row, RssSampler, pct

from conveyor import Conveyor
from conveyor.brokers import open_broker
from conveyor.brokers.base import Broker
from conveyor.job import JobState
from conveyor.worker import Worker

LOAD_PY = str(Path(__file__).resolve().parent.parent / "load.py")
T1_GOALS = {"memory": 5_000.0, "redis": 2_500.0, "sqlite": 500.0}
T2_WALL_GOALS = {"memory": 5.0, "redis": 5.0, "sqlite": 25.0}
BACKLOG_QUEUE = "backlog"
PROBES = 300  # single enqueues / reserve+acks timed for a p99


async def t1_noop(kind: str, jobs: int) -> tuple[Row, float]:
    """T1: jobs/s of one burst worker draining ``jobs`` pre-filled no-op jobs (and that rate)."""
    with worker_bench.broker_url(kind, None) as url:
        elapsed = await worker_bench.drain(url, jobs)
    rate = jobs / elapsed
    goal = T1_GOALS[kind]
    row = Row(
        "T1",
        f"noop x {jobs:,}, 1 worker, async",
        kind,
        f"{rate:,.0f} jobs/s ({elapsed:.1f} s)",
        f">= {goal:,.0f}/s",
        rate >= goal,
    )
    return row, rate


async def t2_sleep(kind: str, jobs: int) -> Row:
    """T2: ``jobs`` jobs of asyncio.sleep(1) at concurrency ``jobs``: wall time and loop lag."""
    with worker_bench.broker_url(kind, None) as url:
        app = Conveyor(url)

        @app.task(name="nap1", queue="t2")
        async def nap() -> None:
            await asyncio.sleep(1)

        async with app:
            for i in range(0, jobs, 1000):
                await app.enqueue_many([nap.request() for _ in range(min(1000, jobs - i))])
            worker = Worker(app, queues=["t2"], concurrency={"async": jobs}, burst=True)
            lag = LagMonitor()
            lag.start()
            started = time.perf_counter()
            await worker.run()
            wall = time.perf_counter() - started
            await lag.stop()
            done = (await app.counts("t2"))["t2"][JobState.COMPLETED]
    lag_p99 = pct(lag.lags_ms, 0.99)
    wall_goal = T2_WALL_GOALS[kind]
    return Row(
        "T2",
        f"sleep(1) x {jobs:,} @ {jobs:,}",
        kind,
        f"wall {wall:.1f} s; lag p99 {lag_p99:.0f} ms; {done:,} done",
        f"wall <= {wall_goal:g} s; lag p99 <= 50 ms",
        wall <= wall_goal and lag_p99 <= 50 and done == jobs,
    )


async def t4_latency(kind: str, rate: float, seconds: float) -> Row:
    """T4: enqueue->start latency at ``rate`` jobs/s (50 % of T1), producer in its own process."""
    with worker_bench.broker_url(kind, None) as url:
        latencies = await worker_bench.latency(url, rate, seconds, separate=True)
    expected = int(rate * seconds)
    p50, p99 = statistics.median(latencies), pct(latencies, 0.99)
    producer = "own process" if kind != "memory" else "same loop"
    return Row(
        "T4",
        f"enqueue->start @ {rate:,.0f}/s (producer: {producer})",
        kind,
        f"p50 {p50:.1f} ms; p99 {p99:.1f} ms; {len(latencies):,}/{expected:,} started",
        "p50 <= 5 ms; p99 <= 50 ms",
        p50 <= 5 and p99 <= 50 and len(latencies) == expected,
    )


# -- T5: a deep backlog -------------------------------------------------------------------------


async def _probe(broker: Broker, queue: str) -> tuple[list[float], list[float]]:
    """Latencies (ms) of PROBES single enqueues, then of PROBES reserve(1)+ack on ``queue``."""
    jobs = broker_bench.make_jobs(PROBES, queue)
    enqueue_ms: list[float] = []
    for job in jobs:
        started = time.perf_counter()
        await broker.enqueue([job])
        enqueue_ms.append((time.perf_counter() - started) * 1000)
    claim_ms: list[float] = []
    for _ in range(PROBES):
        started = time.perf_counter()
        got = await broker.reserve(queue, 1, lease_s=60.0, worker_id="load-probe")
        await broker.ack_many([(job.lease, None) for job in got])
        claim_ms.append((time.perf_counter() - started) * 1000)
        if not got:
            raise RuntimeError(f"queue {queue!r} ran dry while probing")
    return enqueue_ms, claim_ms


async def _fill(broker: Broker, queue: str, n: int, batch: int = 5_000) -> float:
    """Enqueue ``n`` jobs in batches, two batches in flight; the seconds it took.

    Two in flight: building and encoding the next batch (this loop) overlaps with the broker
    storing the previous one (SQLite's thread, or redis-server).
    """
    started = time.perf_counter()
    in_flight = asyncio.Semaphore(2)

    async def one(size: int) -> None:
        async with in_flight:
            await broker.enqueue(broker_bench.make_jobs(size, queue))

    async with asyncio.TaskGroup() as group:
        for i in range(0, n, batch):
            await in_flight.acquire()  # do not build every batch up front: memory stays flat
            in_flight.release()
            group.create_task(one(min(batch, n - i)))
    return time.perf_counter() - started


async def _worker_rss(url: str, seconds: float) -> tuple[float, int]:
    """Peak RSS (MB) of a worker process consuming the backlog for ``seconds``; jobs it ran."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, LOAD_PY, "--backlog-worker", url, "--seconds", str(seconds),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    sampler = RssSampler(child.pid)
    sampler.start()
    out, _ = await child.communicate()
    await sampler.stop()
    if child.returncode != 0:
        raise RuntimeError(f"the backlog worker failed ({child.returncode})")
    return sampler.peak, int(out.decode().split()[-1])


async def backlog_worker(url: str, seconds: float) -> None:
    """The T5 worker process (``load.py --backlog-worker URL``): consume, print jobs run."""
    app = Conveyor(url)
    ran = 0

    @app.task(name="bench.noop", queue=BACKLOG_QUEUE)
    async def noop(*args: Any, **kwargs: Any) -> None:
        nonlocal ran
        ran += 1

    async with app, Worker(app, queues=[BACKLOG_QUEUE], concurrency={"async": 200}):
        await asyncio.sleep(seconds)
    print(ran)


async def _redis_memory(url: str) -> str:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        info = await client.info("memory")
    finally:
        await client.aclose()
    return f"{int(info['used_memory']) / 2**20:,.0f} MB"


async def t5_backlog(kind: str, backlog: int, worker_s: float) -> list[Row]:
    """T5: enqueue and reserve+ack p99 with ``backlog`` queued jobs vs empty; worker RSS."""
    with worker_bench.broker_url(kind, None) as url:
        broker = open_broker(url)
        async with broker:
            empty_enqueue, empty_claim = await _probe(broker, BACKLOG_QUEUE)
            fill_s = await _fill(broker, BACKLOG_QUEUE, backlog)
            deep_enqueue, deep_claim = await _probe(broker, BACKLOG_QUEUE)
            redis_mb = await _redis_memory(url) if kind == "redis" else None
        peak_mb, ran = await _worker_rss(url, worker_s)
    rows = []
    label = f"{backlog:,} backlog"
    for what, empty, deep in (
        ("enqueue", empty_enqueue, deep_enqueue),
        ("reserve+ack", empty_claim, deep_claim),
    ):
        p_empty, p_deep = pct(empty, 0.99), pct(deep, 0.99)
        rows.append(
            Row(
                "T5",
                f"{what} p99, {label} vs empty",
                kind,
                f"{p_deep:.2f} ms vs {p_empty:.2f} ms ({p_deep / p_empty:.1f}x)",
                "<= 2x empty",
                p_deep <= 2 * p_empty,
            )
        )
    extra = f"; filled in {fill_s:.0f} s" + (f"; Redis used_memory {redis_mb}" if redis_mb else "")
    rows.append(
        Row(
            "T5",
            f"worker RSS consuming the {label}",
            kind,
            f"peak {peak_mb:.0f} MB ({ran:,} jobs in {worker_s:g} s){extra}",
            "<= 200 MB",
            peak_mb <= 200,
        )
    )
    return rows
