"""BoundedQueue: lifecycle, put/get, overflow policies, worker errors and metrics."""

from __future__ import annotations

import asyncio
import logging

import pytest

from conveyor.errors import ConveyorError
from conveyor.local import (
    BoundedQueue,
    OverflowPolicy,
    QueueEmptyError,
    QueueError,
    QueueFullError,
    QueueStateError,
    QueueStatus,
)


async def noop(item: object) -> None:
    return None


def accounted(metrics: dict[str, int]) -> int:
    """Everything an accepted item can have become; must equal metrics['enqueued']."""
    return (
        metrics["processed"]
        + metrics["dropped"]
        + metrics["discarded"]
        + metrics["cancelled"]
        + metrics["size"]
        + metrics["in_flight"]
    )


# -- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("maxsize", [0, -1])
def test_maxsize_below_one_is_refused(maxsize: int) -> None:
    with pytest.raises(ValueError, match="maxsize"):
        BoundedQueue(maxsize=maxsize)


def test_unknown_overflow_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        BoundedQueue(overflow="bogus")


def test_negative_timeouts_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        BoundedQueue(timeout=-1)
    with pytest.raises(ValueError, match="grace_period_s"):
        BoundedQueue(grace_period_s=-1)


def test_overflow_accepts_the_policy_value_as_a_string() -> None:
    assert BoundedQueue(overflow="drop_oldest").overflow is OverflowPolicy.DROP_OLDEST


def test_seed_defaults() -> None:
    queue: BoundedQueue[int] = BoundedQueue()
    assert (queue.maxsize, queue.timeout, queue.overflow) == (100, 0.1, OverflowPolicy.BLOCK)
    assert queue.status is QueueStatus.IDLE
    assert QueueStatus.PROCESSING == "processing"  # a str enum with the seed's values
    assert [s.value for s in QueueStatus] == ["idle", "processing", "stopping", "stopped"]


def test_errors_share_the_conveyor_root() -> None:
    for cls in (QueueFullError, QueueEmptyError, QueueStateError):
        assert issubclass(cls, QueueError)
        assert issubclass(cls, ConveyorError)
    assert "full" in str(QueueFullError())  # the docstring is the default message


# -- lifecycle ---------------------------------------------------------------------------------


async def test_put_before_start_raises_state_error_naming_the_state() -> None:
    queue: BoundedQueue[int] = BoundedQueue()
    with pytest.raises(QueueStateError, match="idle") as info:
        await queue.put(1)
    assert (info.value.operation, info.value.status) == ("put", "idle")
    with pytest.raises(QueueStateError):
        queue.put_nowait(1)
    with pytest.raises(QueueStateError):
        await queue.get()
    with pytest.raises(QueueStateError):
        await queue.start_workers(noop, 1)


async def test_start_is_idempotent_and_a_stopped_queue_restarts() -> None:
    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start()
    assert queue.status is QueueStatus.PROCESSING
    assert await queue.put(1)
    await queue.stop(drain=False)
    assert queue.status is QueueStatus.STOPPED
    with pytest.raises(QueueStateError, match="stopped"):
        await queue.put(2)
    await queue.start()
    assert await queue.put(3)
    assert queue.get_nowait() == 3
    queue.task_done()
    await queue.stop()
    assert queue.metrics["enqueued"] == 2  # metrics carry on across restarts


async def test_stop_is_idempotent_and_stopping_an_idle_queue_marks_it_stopped() -> None:
    queue: BoundedQueue[int] = BoundedQueue()
    assert await queue.stop() == 0
    assert queue.status is QueueStatus.STOPPED
    assert await queue.stop() == 0


async def test_start_while_stopping_raises() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(item: int) -> None:
        started.set()
        await release.wait()

    queue: BoundedQueue[int] = BoundedQueue()
    await queue.start()
    await queue.start_workers(slow, 1)
    await queue.put(1)
    await started.wait()
    stopping = asyncio.create_task(queue.stop(timeout=5))
    await asyncio.sleep(0)  # let stop() begin: the queue is now STOPPING
    assert queue.status is QueueStatus.STOPPING
    with pytest.raises(QueueStateError, match="stopping"):
        await queue.start()
    release.set()
    assert await stopping == 0
    assert queue.metrics["processed"] == 1


async def test_starting_workers_twice_raises() -> None:
    async with BoundedQueue[int]() as queue:
        await queue.start_workers(noop, 2)
        assert queue.worker_count == 2
        with pytest.raises(QueueStateError, match="already running"):
            await queue.start_workers(noop, 1)


async def test_num_workers_below_one_is_refused() -> None:
    async with BoundedQueue[int]() as queue:
        with pytest.raises(ValueError, match="num_workers"):
            await queue.start_workers(noop, 0)


# -- put / get ---------------------------------------------------------------------------------


async def test_put_and_get_are_fifo_and_join_waits_for_task_done() -> None:
    async with BoundedQueue[int](maxsize=5) as queue:
        for i in range(3):
            assert await queue.put(i)
        assert [queue.get_nowait(), await queue.get()] == [0, 1]
        queue.task_done()
        queue.task_done()
        joined = asyncio.create_task(queue.join())
        assert queue.get_nowait() == 2
        await asyncio.sleep(0)
        assert not joined.done()  # one item is still handed out
        queue.task_done()
        await joined
        with pytest.raises(ValueError, match="task_done"):
            queue.task_done()


async def test_block_policy_reports_backpressure_after_the_timeout() -> None:
    async with BoundedQueue[int](maxsize=2, timeout=0.02) as queue:
        assert await queue.put(1)
        assert await queue.put(2)
        assert queue.is_full
        assert await queue.put(3) is False
        assert await queue.put(3, timeout=0) is False
        with pytest.raises(QueueFullError) as info:
            queue.put_nowait(3)
        assert info.value.maxsize == 2
        metrics = queue.metrics
        assert metrics["backpressure_events"] == 3
        assert (metrics["enqueued"], metrics["size"]) == (2, 2)
        await queue.stop(drain=False)


async def test_blocked_put_succeeds_when_room_is_made() -> None:
    async with BoundedQueue[int](maxsize=1, timeout=5) as queue:
        await queue.put(1)
        putting = asyncio.create_task(queue.put(2))
        await asyncio.sleep(0)
        assert not putting.done()
        assert queue.get_nowait() == 1
        assert await putting is True
        assert queue.get_nowait() == 2
        queue.task_done()
        queue.task_done()
        assert queue.metrics["backpressure_events"] == 0


async def test_blocked_put_raises_state_error_when_the_queue_stops() -> None:
    queue: BoundedQueue[int] = BoundedQueue(maxsize=1, timeout=30)
    await queue.start()
    await queue.put(1)
    putting = asyncio.create_task(queue.put(2))
    await asyncio.sleep(0)
    assert await queue.stop(drain=False) == 1
    with pytest.raises(QueueStateError):
        await putting
    assert queue.metrics["enqueued"] == 1


async def test_cancelled_blocked_put_passes_its_wakeup_on() -> None:
    async with BoundedQueue[int](maxsize=1, timeout=30) as queue:
        await queue.put(0)
        first = asyncio.create_task(queue.put(1))
        second = asyncio.create_task(queue.put(2))
        await asyncio.sleep(0)
        queue.get_nowait()  # room for one: wakes `first` ...
        first.cancel()  # ... which leaves, so `second` must get the room
        assert await second is True
        with pytest.raises(asyncio.CancelledError):
            await first
        assert queue.get_nowait() == 2
        queue.task_done()
        queue.task_done()


async def test_get_times_out_with_queue_empty_error() -> None:
    async with BoundedQueue[int](timeout=0.01) as queue:
        with pytest.raises(QueueEmptyError, match="within"):
            await queue.get()
        with pytest.raises(QueueEmptyError):
            await queue.get(timeout=0)
        with pytest.raises(QueueEmptyError):
            queue.get_nowait()


async def test_blocked_get_raises_state_error_when_the_queue_stops() -> None:
    queue: BoundedQueue[int] = BoundedQueue(timeout=30)
    await queue.start()
    getting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    await queue.stop()
    with pytest.raises(QueueStateError):
        await getting


async def test_blocked_get_receives_an_item_put_later() -> None:
    async with BoundedQueue[str](timeout=30) as queue:
        getting = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        await queue.put("x")
        assert await getting == "x"
        queue.task_done()


# -- overflow policies -------------------------------------------------------------------------


async def test_reject_raises_queue_full_at_once() -> None:
    async with BoundedQueue[int](maxsize=1, timeout=30, overflow="reject") as queue:
        await queue.put(1)
        with pytest.raises(QueueFullError, match="reject"):
            await queue.put(2)  # would wait 30 s under block
        with pytest.raises(QueueFullError):
            queue.put_nowait(2)
        assert queue.metrics["backpressure_events"] == 2
        await queue.stop(drain=False)


async def test_drop_oldest_keeps_the_newest_maxsize_items_under_a_flood() -> None:
    dropped: list[int] = []
    queue: BoundedQueue[int] = BoundedQueue(
        maxsize=10, overflow=OverflowPolicy.DROP_OLDEST, on_drop=dropped.append
    )
    async with queue:
        for i in range(100_000):
            assert await queue.put(i)
        assert [queue.get_nowait() for _ in range(queue.size)] == list(range(99_990, 100_000))
        for _ in range(10):
            queue.task_done()
        metrics = queue.metrics
    assert dropped == list(range(99_990))
    assert metrics["dropped"] == 99_990
    assert metrics["enqueued"] == 100_000
    assert metrics["high_water_mark"] == 10
    assert metrics["backpressure_events"] == 0
    assert accounted(metrics) == metrics["enqueued"]


async def test_drop_oldest_under_a_flood_with_a_worker_never_processes_a_dropped_item() -> None:
    dropped: set[int] = set()
    processed: list[int] = []

    async def work(item: int) -> None:
        processed.append(item)
        await asyncio.sleep(0)

    queue: BoundedQueue[int] = BoundedQueue(maxsize=10, overflow="drop_oldest", on_drop=dropped.add)
    async with queue:
        await queue.start_workers(work, 2)
        for i in range(100_000):
            queue.put_nowait(i)
            if i % 1000 == 0:
                await asyncio.sleep(0)  # give the workers a turn now and then
        await queue.join()
    assert not dropped & set(processed)
    assert len(processed) == len(set(processed))
    assert len(processed) + len(dropped) == 100_000
    assert processed[-10:] == list(range(99_990, 100_000))


async def test_drop_newest_drops_the_incoming_item() -> None:
    dropped: list[int] = []
    async with BoundedQueue[int](maxsize=2, overflow="drop_newest", on_drop=dropped.append) as q:
        for i in range(5):
            assert await q.put(i)
        q.put_nowait(5)
        assert [q.get_nowait(), q.get_nowait()] == [0, 1]
        q.task_done()
        q.task_done()
        metrics = q.metrics
    assert dropped == [2, 3, 4, 5]
    assert (metrics["enqueued"], metrics["dropped"], metrics["processed"]) == (6, 4, 2)


async def test_a_failing_on_drop_callback_is_logged_and_the_put_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(item: int) -> None:
        raise RuntimeError("boom")

    async with BoundedQueue[int](maxsize=1, overflow="drop_oldest", on_drop=explode) as queue:
        await queue.put(1)
        assert await queue.put(2)
        assert queue.get_nowait() == 2
        queue.task_done()
    assert "on_drop callback failed" in caplog.text


# -- workers -----------------------------------------------------------------------------------


async def test_a_failing_worker_func_goes_to_the_error_handler_and_the_worker_goes_on() -> None:
    seen: list[tuple[str, int]] = []
    done: list[int] = []

    async def work(item: int) -> None:
        if item % 2:
            raise ValueError(f"odd {item}")
        done.append(item)

    async def on_error(exc: Exception, item: int) -> None:
        seen.append((str(exc), item))

    async with BoundedQueue[int]() as queue:
        await queue.start_workers(work, 1, on_error)
        for i in range(6):
            await queue.put(i)
        await queue.join()
        assert queue.worker_count == 1
        metrics = queue.metrics
    assert done == [0, 2, 4]
    assert seen == [("odd 1", 1), ("odd 3", 3), ("odd 5", 5)]
    assert (metrics["processed"], metrics["errors"]) == (6, 3)


async def test_an_error_handler_that_raises_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def work(item: int) -> None:
        raise ValueError(item)

    async def on_error(exc: Exception, item: int) -> None:
        raise RuntimeError("handler broke")

    async with BoundedQueue[int]() as queue:
        await queue.start_workers(work, 1, on_error)
        for i in range(3):
            await queue.put(i)
        await queue.join()
        assert queue.worker_count == 1
        metrics = queue.metrics
    assert (metrics["errors"], metrics["error_handler_errors"]) == (3, 3)
    assert "error_handler failed" in caplog.text


async def test_without_error_handler_failures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.local.errors")

    async def work(item: int) -> None:
        raise ValueError("bad item")

    async with BoundedQueue[int](logger=logger) as queue:
        await queue.start_workers(work, 1)
        await queue.put(7)
        await queue.join()
    [record] = [r for r in caplog.records if r.name == "test.local.errors"]
    assert record.levelno == logging.ERROR
    assert "worker_func failed on 7" in record.getMessage()
    assert record.exc_info is not None


async def test_cancelled_error_from_the_worker_func_propagates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def work(item: int) -> None:
        raise asyncio.CancelledError

    async with BoundedQueue[int]() as queue:
        await queue.start_workers(work, 1)
        [worker] = [t for t in asyncio.all_tasks() if t.get_name().startswith("conveyor.local")]
        await queue.put(1)
        await asyncio.wait([worker])
        assert worker.cancelled()  # not swallowed as an "error"
        metrics = queue.metrics
        assert (metrics["cancelled"], metrics["errors"], queue.worker_count) == (1, 0, 0)
    assert "was cancelled while the queue is processing" in caplog.text


async def test_metrics_is_a_snapshot_with_size_and_high_water_mark() -> None:
    async with BoundedQueue[int](maxsize=5) as queue:
        for i in range(4):
            await queue.put(i)
        queue.get_nowait()
        queue.task_done()
        snapshot = queue.metrics
        snapshot["enqueued"] = 999
        metrics = queue.metrics
        await queue.stop(drain=False)
    assert metrics == {
        "enqueued": 4,
        "processed": 1,
        "errors": 0,
        "error_handler_errors": 0,
        "backpressure_events": 0,
        "dropped": 0,
        "discarded": 0,
        "cancelled": 0,
        "size": 3,
        "in_flight": 0,
        "high_water_mark": 4,
    }
    assert "size=3/5" in repr(queue) or "stopped" in repr(queue)
