"""Stopping a BoundedQueue: seed 000's testing strategy, done right, and the bounds of stop()."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from conveyor.local import BoundedQueue, QueueStatus

# stop() promises timeout + 100 ms; the assertions allow the same on a loaded 2-core machine.
STOP_SLACK_S = 0.1


def worker_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("conveyor.local.worker")]


async def timed_stop(queue: BoundedQueue[int], **kwargs: object) -> tuple[int, float]:
    start = time.perf_counter()
    discarded = await queue.stop(**kwargs)  # type: ignore[arg-type]
    return discarded, time.perf_counter() - start


# -- seed 000, test 1: an idle processing loop stops promptly ---------------------------------


async def test_stop_on_an_empty_queue_returns_in_under_100ms() -> None:
    running = asyncio.Event()

    async def work(item: int) -> None:
        running.set()

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(work, 4)
    await queue.put(0)
    await running.wait()  # the workers are up; with the queue empty they now wait for items
    discarded, elapsed = await timed_stop(queue)
    assert discarded == 0
    assert elapsed < 0.1
    assert queue.status is QueueStatus.STOPPED


# -- seed 000, test 2: queued messages at shutdown are drained, or discarded and counted -------


async def test_stop_with_drain_processes_the_ten_queued_items() -> None:
    processed: list[int] = []

    async def work(item: int) -> None:
        processed.append(item)
        await asyncio.sleep(0)

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    for i in range(10):
        await queue.put(i)
    await queue.start_workers(work, 3)
    assert queue.size == 10  # the workers have not run yet
    assert await queue.stop(drain=True) == 0
    assert sorted(processed) == list(range(10))
    metrics = queue.metrics
    assert (metrics["processed"], metrics["discarded"], metrics["size"]) == (10, 0, 0)


async def test_stop_without_drain_discards_and_counts_the_ten_queued_items() -> None:
    processed: list[int] = []

    async def work(item: int) -> None:
        processed.append(item)

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    for i in range(10):
        await queue.put(i)
    await queue.start_workers(work, 3)
    assert await queue.stop(drain=False) == 10
    assert processed == []
    metrics = queue.metrics
    assert (metrics["discarded"], metrics["size"], metrics["enqueued"]) == (10, 0, 10)


async def test_stop_without_drain_lets_the_item_in_hand_finish() -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    processed: list[int] = []

    async def work(item: int) -> None:
        started.set()
        await release.wait()
        processed.append(item)

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(work, 1)
    for i in range(10):
        await queue.put(i)
    await started.wait()
    stopping = asyncio.create_task(queue.stop(drain=False))
    release.set()
    assert await stopping == 9
    assert processed == [0]
    assert queue.metrics["cancelled"] == 0


async def test_stop_with_drain_but_no_workers_discards_at_once() -> None:
    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    for i in range(10):
        await queue.put(i)
    discarded, elapsed = await timed_stop(queue, timeout=5, drain=True)
    assert discarded == 10
    assert elapsed < 0.1  # nobody could drain them: no reason to wait the timeout out


# -- seed 000, test 3: every background task is finished after stop ---------------------------


@pytest.mark.parametrize("drain", [True, False])
async def test_all_worker_tasks_are_done_after_stop(drain: bool) -> None:
    async def work(item: int) -> None:
        await asyncio.sleep(0)

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(work, 8)
    for i in range(50):
        await queue.put(i)
    tasks = worker_tasks()
    assert len(tasks) == 8
    await queue.stop(drain=drain)
    assert all(task.done() for task in tasks)
    assert worker_tasks() == []
    assert queue.worker_count == 0


# -- seed 000, test 4: the handler can be garbage-collected after stop ------------------------


class Handler:
    """A message handler holding state, as seed 000's exchange handlers do."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def __call__(self, item: int) -> None:
        self.seen.append(item)
        if item == 3:
            raise ValueError(item)

    async def on_error(self, exc: Exception, item: int) -> None:
        self.seen.append(-item)


async def test_the_handler_is_garbage_collected_after_stop() -> None:
    handler = Handler()
    ref = weakref.ref(handler)
    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(handler, 3, handler.on_error)
    for i in range(5):
        await queue.put(i)
    await queue.join()
    await queue.stop()
    assert sorted(handler.seen) == [-3, 0, 1, 2, 3, 4]
    del handler
    gc.collect()
    assert ref() is None  # released by stop(), while the queue itself is still alive
    del queue
    gc.collect()


async def test_a_closure_handler_is_garbage_collected_after_stop_and_del() -> None:
    async def run_and_stop() -> list[weakref.ref[object]]:
        queue: BoundedQueue[int] = BoundedQueue()

        async def handler(item: int) -> None:
            # A closure over the queue: a cycle that must not keep either alive.
            assert queue.status is not QueueStatus.IDLE

        await queue.start()
        await queue.start_workers(handler, 2)
        await queue.put(1)
        await queue.join()
        await queue.stop()
        return [weakref.ref(handler), weakref.ref(queue)]

    refs = await run_and_stop()
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


@pytest.mark.parametrize("fails", [False, True])
async def test_an_idle_worker_does_not_keep_the_last_item_alive(fails: bool) -> None:
    class Item:
        pass

    async def work(item: Item) -> None:
        if fails:
            raise ValueError("failed items must not be kept either")

    async def on_error(exc: Exception, item: Item) -> None:
        pass

    async with BoundedQueue[Item]() as queue:
        await queue.start_workers(work, 1, on_error)
        item = Item()
        ref = weakref.ref(item)
        await queue.put(item)
        del item
        await queue.join()
        gc.collect()
        assert ref() is None  # the worker is idle, waiting for the next item
        assert queue.metrics["errors"] == int(fails)


async def test_a_handler_cancelled_at_stop_is_garbage_collected() -> None:
    entered = asyncio.Event()

    class Stuck:
        async def __call__(self, item: int) -> None:
            entered.set()
            await asyncio.Event().wait()

    handler = Stuck()
    ref = weakref.ref(handler)
    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(handler, 1)
    await queue.put(1)
    await entered.wait()
    await queue.stop(timeout=0)
    del handler
    gc.collect()
    assert ref() is None


# -- bounds: stuck handlers, stubborn handlers, concurrent and cancelled stops ----------------


@pytest.mark.parametrize("drain", [True, False])
async def test_a_stuck_handler_is_cancelled_when_the_timeout_expires(drain: bool) -> None:
    entered = asyncio.Event()
    saw_cancel: list[bool] = []

    async def work(item: int) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancel.append(True)
            raise

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(work, 1)
    for i in range(6):
        await queue.put(i)
    await entered.wait()
    timeout = 0.2
    discarded, elapsed = await timed_stop(queue, timeout=timeout, drain=drain)
    assert timeout <= elapsed < timeout + STOP_SLACK_S
    assert saw_cancel == [True]
    assert discarded == 5  # the backlog behind the stuck item, drained or not
    metrics = queue.metrics
    assert (metrics["cancelled"], metrics["discarded"], metrics["processed"]) == (1, 5, 0)
    assert metrics["enqueued"] == 6
    assert worker_tasks() == []


async def test_a_handler_that_swallows_cancellation_does_not_hang_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(item: int) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # ignores the first cancellation

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(stubborn, 1)
    await queue.put(1)
    await entered.wait()
    [straggler] = worker_tasks()
    timeout = 0.1
    _, elapsed = await timed_stop(queue, timeout=timeout)
    assert elapsed < timeout + STOP_SLACK_S
    assert queue.status is QueueStatus.STOPPED
    assert "ignored cancellation" in caplog.text
    # A restart does not bring the straggler back as an untracked worker.
    await queue.start()
    await queue.put(2)
    release.set()
    await asyncio.wait([straggler])
    assert queue.size == 1
    await queue.stop(drain=False)


async def test_concurrent_stops_share_one_shutdown() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def work(item: int) -> None:
        started.set()
        await release.wait()

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(work, 1)
    for i in range(4):
        await queue.put(i)
    await started.wait()
    first = asyncio.create_task(queue.stop(drain=False))
    second = asyncio.create_task(queue.stop())
    release.set()
    assert await asyncio.gather(first, second) == [3, 3]
    assert queue.metrics["discarded"] == 3


async def test_cancelling_the_caller_of_stop_does_not_leave_the_queue_half_stopped() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def work(item: int) -> None:
        started.set()
        await release.wait()

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(work, 1)
    await queue.put(1)
    await started.wait()
    caller = asyncio.create_task(queue.stop())
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert queue.status is QueueStatus.STOPPING
    release.set()
    assert await queue.stop() == 0  # joins the shutdown still under way
    assert queue.status is QueueStatus.STOPPED
    assert queue.metrics["processed"] == 1


async def test_leaving_async_with_by_cancellation_discards_the_backlog() -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    queues: list[BoundedQueue[int]] = []

    async def work(item: int) -> None:
        started.set()
        await release.wait()

    async def body() -> None:
        async with BoundedQueue[int]() as queue:
            queues.append(queue)
            await queue.start_workers(work, 1)
            for i in range(5):
                await queue.put(i)
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    [queue] = queues
    metrics = queue.metrics
    assert queue.status is QueueStatus.STOPPED
    assert (metrics["processed"], metrics["discarded"]) == (1, 4)


async def test_join_is_released_by_stop() -> None:
    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.put(1)
    joining = asyncio.create_task(queue.join())
    await asyncio.sleep(0)
    assert not joining.done()
    await queue.stop()
    await asyncio.wait_for(joining, 1)
