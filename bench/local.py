"""Put+process throughput of conveyor.local.BoundedQueue against a bare asyncio.Queue.

Both sides use the same maxsize, the same number of worker tasks and the same no-op async
handler; the clock runs from the first put to the end of join(). Each case runs several times,
alternating sides, and the best run counts (the least disturbed by the rest of the machine).
maxsize 100 is the queue's default; maxsize 1 is the worst case, where every put finds the
queue full and waits for room.

    .venv/bin/python bench/local.py [--items 200000] [--workers 1 4 16] [--maxsize 100 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from rich.console import Console
from rich.table import Table

from conveyor.local import BoundedQueue

TARGET_RATIO = 0.70


async def noop(item: int) -> None:
    return None


async def bare_queue(items: int, workers: int, maxsize: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize)

    async def worker() -> None:
        while True:
            item = await queue.get()
            try:
                await noop(item)
            finally:
                queue.task_done()

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    start = time.perf_counter()
    for i in range(items):
        await queue.put(i)
    await queue.join()
    elapsed = time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed


async def conveyor_queue(items: int, workers: int, maxsize: int) -> float:
    async with BoundedQueue[int](maxsize=maxsize) as queue:
        await queue.start_workers(noop, workers)
        start = time.perf_counter()
        for i in range(items):
            while not await queue.put(i):  # backpressure: the queue stayed full for 0.1 s
                pass
        await queue.join()
        elapsed = time.perf_counter() - start
        assert queue.metrics["processed"] == items
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--maxsize", type=int, nargs="+", default=[100, 1])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    table = Table(title=f"put+process, no-op handler, {args.items:,} items, best of {args.runs}")
    table.add_column("maxsize", justify="right")
    table.add_column("workers", justify="right")
    table.add_column("asyncio.Queue items/s", justify="right")
    table.add_column("conveyor.local items/s", justify="right")
    table.add_column("ratio", justify="right")
    worst = float("inf")
    for maxsize in args.maxsize:
        for workers in args.workers:
            bare_best = conveyor_best = float("inf")
            for _ in range(args.runs):
                bare_best = min(bare_best, asyncio.run(bare_queue(args.items, workers, maxsize)))
                conveyor_best = min(
                    conveyor_best, asyncio.run(conveyor_queue(args.items, workers, maxsize))
                )
            ratio = bare_best / conveyor_best
            worst = min(worst, ratio)
            table.add_row(
                str(maxsize),
                str(workers),
                f"{args.items / bare_best:,.0f}",
                f"{args.items / conveyor_best:,.0f}",
                f"{ratio:.0%}",
            )
    console = Console()
    console.print(table)
    verdict = "meets" if worst >= TARGET_RATIO else "MISSES"
    console.print(f"lowest ratio {worst:.0%}: {verdict} the {TARGET_RATIO:.0%} target")


if __name__ == "__main__":
    main()
