"""Seed 003's "Usage Patterns", run as written against conveyor.local.

Each test defines the names the seed's snippet uses (``worker_func``, ``item``, ``items``...),
then the snippet itself, verbatim between the ``--- seed 003`` markers, then checks what it did.
The snippets leave queues running (as the seed's do); a fixture stops every queue a test
started, so no worker outlives its test.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.local import BoundedQueue, QueueStatus, WorkQueue

logger = logging.getLogger("seed003")


@pytest.fixture(autouse=True)
async def started_queues(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[BoundedQueue[Any]]]:
    """Every BoundedQueue started during the test (WorkQueue included), stopped afterwards."""
    started: list[BoundedQueue[Any]] = []
    start = BoundedQueue.start

    async def tracking_start(self: BoundedQueue[Any]) -> None:
        started.append(self)
        await start(self)

    monkeypatch.setattr(BoundedQueue, "start", tracking_start)
    yield started
    for queue in started:
        await queue.stop(timeout=1)


async def test_basic_usage_with_context_manager(
    started_queues: list[BoundedQueue[Any]],
) -> None:
    processed: list[str] = []

    async def worker_func(item: str) -> None:
        await asyncio.sleep(0)
        processed.append(item)

    item = "order-42"

    # --- seed 003, "Basic Usage with Context Manager" ---
    async def example():
        # Using BoundedQueue with context manager
        async with BoundedQueue(maxsize=100) as queue:
            # Start workers
            await queue.start_workers(worker_func, num_workers=5)

            # Add items to the queue
            await queue.put(item)

            # Wait for all items to be processed
            await queue.join()

        # Using WorkQueue with context manager
        async with WorkQueue(maxsize=100, concurrency_limit=5) as queue:
            # Process items with a worker function
            await queue.process(worker_func)

            # Add items to the queue
            await queue.put(item)

            # Wait for all items to be processed
            await queue.join()

    # ---

    await example()
    assert processed == ["order-42", "order-42"]
    assert len(started_queues) == 2
    assert all(q.status is QueueStatus.STOPPED for q in started_queues)  # left by `async with`
    assert [q.metrics["processed"] for q in started_queues] == [1, 1]


async def test_batch_processing() -> None:
    processed: list[object] = []

    async def worker_func(item: object) -> None:
        processed.append(item)

    item1, item2, item3 = "a", "b", "c"

    # --- seed 003, "Batch Processing" ---
    async def example():
        # Create a work queue
        queue = WorkQueue(maxsize=100, concurrency_limit=5)

        # Process a batch of items
        items = [item1, item2, item3, ...]
        await queue.batch_process(items, worker_func)

    # ---

    # The seed's `...` is a literal Ellipsis: the batch has four items, and all four go through.
    await example()
    assert Counter(processed) == Counter([item1, item2, item3, ...])

    # And batch_process reports each item's outcome, in order.
    queue: WorkQueue[object] = WorkQueue(maxsize=100, concurrency_limit=5)
    outcomes = await queue.batch_process([item1, item2, item3], worker_func)
    assert [(o.item, o.ok) for o in outcomes] == [("a", True), ("b", True), ("c", True)]


async def test_handling_backpressure(started_queues: list[BoundedQueue[Any]]) -> None:
    processed: list[str] = []

    async def worker_func(item: str) -> None:
        processed.append(item)

    item = "reading-1"

    # --- seed 003, "Handling Backpressure" ---
    async def example():
        # Create a queue
        queue = WorkQueue(maxsize=10)

        # Start the queue
        await queue.start()
        await queue.process(worker_func)

        # Add items with backpressure handling
        while True:
            if await queue.put(item):
                break  # Item was added successfully
            # Backpressure applied, wait and retry
            await asyncio.sleep(0.1)

    # ---

    await example()
    [queue] = started_queues
    await queue.join()
    assert processed == ["reading-1"]


async def test_handling_backpressure_loop_rides_out_a_full_queue() -> None:
    """The seed's retry loop against a queue that is full when it starts."""
    release = asyncio.Event()
    processed: list[int] = []

    async def worker_func(item: int) -> None:
        await release.wait()
        processed.append(item)

    queue: WorkQueue[int] = WorkQueue(maxsize=10)
    await queue.start()
    await queue.process(worker_func)
    for i in range(11):  # one in the worker's hands, ten queued: full
        while not await queue.put(i):
            pass
    assert queue.is_full
    item = 11
    # The worker resumes a little later, as a slow downstream service would.
    asyncio.get_running_loop().call_later(0.15, release.set)

    # Add items with backpressure handling (seed 003's loop)
    while True:
        if await queue.put(item):
            break  # Item was added successfully
        # Backpressure applied, wait and retry
        await asyncio.sleep(0.1)

    await queue.join()
    assert processed == list(range(12))
    assert queue.metrics["backpressure_events"] >= 1
    await queue.stop()


async def test_error_handling(
    started_queues: list[BoundedQueue[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    async def worker_func(item: int) -> None:
        if item < 0:
            raise ValueError("negative item")

    # --- seed 003, "Error Handling" ---
    async def example():
        # Define an error handler
        async def error_handler(error, item):
            logger.error(f"Error processing item {item}: {error}")  # noqa: G004
            # Optionally retry or store the item for later processing

        # Create a queue with error handling
        queue = WorkQueue(maxsize=100)

        # Start processing with error handler
        await queue.start()
        await queue.process(worker_func, error_handler=error_handler)

    # ---

    await example()
    [queue] = started_queues
    for i in (1, -2, 3):
        await queue.put(i)
    await queue.join()
    assert queue.worker_count == 1  # the failure did not kill the worker
    assert [r.getMessage() for r in caplog.records if r.name == "seed003"] == [
        "Error processing item -2: negative item"
    ]
    metrics = queue.metrics
    assert (metrics["processed"], metrics["errors"]) == (3, 1)
