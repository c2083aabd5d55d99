"""End-to-end worker benchmark: drain rate, enqueue->start latency, and sleep-job concurrency.

Run: .venv/bin/python bench/worker.py [--brokers memory,sqlite,redis] [--jobs 20000]

One worker in this process, per broker:
  drain     N no-op async jobs pre-filled, then one worker in burst mode drains them (jobs/s)
  latency   jobs enqueued at a fixed rate (default 200/s) while the worker runs; the time from
            the enqueue call to the task body starting (p50/p99, ms). The producer runs in a
            separate process (this script with --produce) with its own loop and broker, as a
            producer would, so its enqueue work does not share the worker's event loop; both
            read the same system-wide monotonic clock (CLOCK_MONOTONIC), and the job carries its
            send time. The memory broker lives in this process only, so there the producer is a
            task on the worker's loop. SQLite cannot notify another process: a worker sees other
            processes' enqueues by its poll (poll_interval_ms, 50 ms by default), which is what
            its figure shows (in one process it wakes at once).
  sleep     2,000 jobs of asyncio.sleep(0.01) at concurrency 10 (ideal 2.0 s)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# ``python bench/worker.py`` puts bench/ first on sys.path, where bench/http.py would shadow the
# standard library's ``http`` package (imported by prometheus_client): drop it before importing
# conveyor.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _HERE]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from conveyor import Conveyor  # noqa: E402
from conveyor.testing.redis_server import RedisServer  # noqa: E402
from conveyor.worker import Worker  # noqa: E402

console = Console()


@contextmanager
def broker_url(kind: str, redis_url: str | None) -> Iterator[str]:
    """A fresh broker URL of ``kind`` (a private redis-server unless one is given)."""
    if kind == "memory":
        yield "memory://"
    elif kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}"
    elif redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        yield redis_url
    else:
        with RedisServer() as server:
            yield server.url


async def drain(url: str, jobs: int) -> float:
    """Seconds for one burst worker to drain ``jobs`` pre-filled no-op jobs."""
    app = Conveyor(url)

    @app.task(name="noop", queue="bench")
    async def noop() -> None:
        return None

    async with app:
        for i in range(0, jobs, 1000):
            await app.enqueue_many([noop.request() for _ in range(min(1000, jobs - i))])
        worker = Worker(app, queues=["bench"], concurrency={"async": 200}, burst=True)
        gc.collect()
        t0 = time.perf_counter()
        await worker.run()
        elapsed = time.perf_counter() - t0
        counts = (await app.counts("bench"))["bench"]
        assert counts["completed"] == jobs, counts  # type: ignore[index]
    return elapsed


async def latency(url: str, rate: float, seconds: float, *, separate: bool = True) -> list[float]:
    """Enqueue->start latencies (ms) at ``rate`` jobs/s for ``seconds``.

    ``separate``: the producer runs in its own process (brokers shared between processes only).
    """
    app = Conveyor(url)
    latencies: list[float] = []
    n = int(rate * seconds)

    @app.task(name="mark", queue="lat")
    async def mark(sent: float) -> None:
        latencies.append((time.monotonic() - sent) * 1000)

    async with app, Worker(app, queues=["lat"], concurrency={"async": 50}):
        await asyncio.sleep(0.5)  # let the fetcher reach its blocking wait
        if separate and app.broker.capabilities.shared:
            producer = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--produce", url, "--rate", str(rate),
                "--seconds", str(seconds),
            )  # fmt: skip
            if await producer.wait() != 0:
                raise RuntimeError(f"the producer process failed ({producer.returncode})")
        else:
            await produce(app, rate, n)
        deadline = time.monotonic() + 10
        while len(latencies) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return latencies


async def produce(app: Conveyor, rate: float, n: int) -> None:
    """Enqueue ``n`` jobs of ``mark`` at ``rate`` per second, each carrying its send time."""
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await app.enqueue("mark", args=[time.monotonic()], queue="lat")


async def producer_main(url: str, rate: float, seconds: float) -> None:
    """The latency benchmark's producer process (``--produce URL``)."""
    async with Conveyor(url) as app:
        await produce(app, rate, int(rate * seconds))


async def sleeps(url: str, jobs: int = 2000, concurrency: int = 10) -> float:
    """Seconds to run ``jobs`` jobs of asyncio.sleep(0.01) at ``concurrency``."""
    app = Conveyor(url)

    @app.task(name="nap", queue="nap")
    async def nap() -> None:
        await asyncio.sleep(0.01)

    async with app:
        await app.enqueue_many([nap.request() for _ in range(jobs)])
        worker = Worker(app, queues=["nap"], concurrency={"async": concurrency}, burst=True)
        t0 = time.perf_counter()
        await worker.run()
        return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", default="memory,sqlite,redis")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument(
        "--producer",
        choices=["process", "loop"],
        default="process",
        help="latency: the producer in its own process (default) or on the worker's loop",
    )
    parser.add_argument("--produce", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        await producer_main(args.produce, args.rate, args.seconds)
        return

    table = Table(
        title=f"conveyor worker, one process ({args.jobs:,} no-op jobs; latency producer: "
        f"{'own process' if args.producer == 'process' else 'worker loop'})"
    )
    for col in (
        "broker",
        "drain jobs/s",
        f"latency p50 ms @{args.rate:g}/s",
        "latency p99 ms",
        "2,000 x sleep(0.01) @10 s",
        "vs ideal 2.0 s",
    ):
        table.add_column(col, justify="right")
    for kind in args.brokers.split(","):
        with broker_url(kind, args.redis_url) as url:
            console.print(f"[dim]{kind}: drain...[/dim]")
            drained = await drain(url, args.jobs)
        with broker_url(kind, args.redis_url) as url:
            console.print(f"[dim]{kind}: latency...[/dim]")
            lat = await latency(url, args.rate, args.seconds, separate=args.producer == "process")
        with broker_url(kind, args.redis_url) as url:
            console.print(f"[dim]{kind}: sleeps...[/dim]")
            slept = await sleeps(url)
        table.add_row(
            kind,
            f"{args.jobs / drained:,.0f}",
            f"{statistics.median(lat):.2f}",
            f"{pct(lat, 0.99):.2f}",
            f"{slept:.2f}",
            f"{(slept / 2.0 - 1) * 100:+.1f}%",
        )
    console.print(table)


if __name__ == "__main__":
    asyncio.run(main())
