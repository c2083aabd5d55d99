"""WorkQueue (process, batch_process) and the pydantic QueueConfig."""

from __future__ import annotations

import asyncio

import pydantic
import pytest

from conveyor.local import BatchOutcome, QueueConfig, QueueStateError, QueueStatus, WorkQueue


async def test_process_starts_concurrency_limit_workers_by_default() -> None:
    async with WorkQueue[int](concurrency_limit=5) as queue:
        await queue.process(lambda item: asyncio.sleep(0))
        assert queue.queue.worker_count == 5


async def test_process_starts_one_worker_without_a_limit() -> None:
    async with WorkQueue[int]() as queue:
        await queue.process(lambda item: asyncio.sleep(0))
        assert queue.queue.worker_count == 1


async def test_more_workers_than_the_concurrency_limit_is_refused() -> None:
    async with WorkQueue[int](concurrency_limit=2) as queue:
        with pytest.raises(ValueError, match="concurrency_limit"):
            await queue.process(lambda item: asyncio.sleep(0), num_workers=3)


def test_concurrency_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="concurrency_limit"):
        WorkQueue(concurrency_limit=0)


async def test_process_before_start_raises_state_error() -> None:
    queue: WorkQueue[int] = WorkQueue()
    with pytest.raises(QueueStateError):
        await queue.process(lambda item: asyncio.sleep(0))


async def test_workers_process_what_is_put_and_join_waits_for_them() -> None:
    seen: list[int] = []

    async def work(item: int) -> None:
        await asyncio.sleep(0)
        seen.append(item)

    async with WorkQueue[int](maxsize=3, concurrency_limit=2) as queue:
        await queue.process(work)
        for i in range(20):
            assert await queue.put(i, timeout=5)
        await queue.join()
        assert queue.is_empty
        assert not queue.is_full
        assert queue.size == 0
    assert sorted(seen) == list(range(20))
    assert queue.status is QueueStatus.STOPPED
    assert queue.metrics["high_water_mark"] <= 3


async def test_batch_process_returns_outcomes_in_input_order() -> None:
    handled: list[tuple[str, int]] = []

    async def work(item: int) -> int:
        await asyncio.sleep(0.001 * (item % 3))  # finish out of order
        if item == 4:
            raise ValueError("four")
        return item * 10

    async def on_error(exc: Exception, item: int) -> None:
        handled.append((str(exc), item))

    queue: WorkQueue[int] = WorkQueue(concurrency_limit=3)
    outcomes = await queue.batch_process(range(7), work, error_handler=on_error)
    assert [o.item for o in outcomes] == list(range(7))
    assert [o.result for o in outcomes if o.ok] == [0, 10, 20, 30, 50, 60]
    [failed] = [o for o in outcomes if not o.ok]
    assert failed.item == 4
    assert isinstance(failed.error, ValueError)
    assert handled == [("four", 4)]  # the error handler sees the item itself
    assert outcomes[0] == BatchOutcome(0, ok=True, result=0)
    metrics = queue.metrics
    assert (metrics["enqueued"], metrics["processed"], metrics["errors"]) == (7, 7, 1)
    assert queue.status is QueueStatus.IDLE  # the batch ran on its own queue


async def test_batch_process_waits_under_backpressure_and_never_drops() -> None:
    in_flight = 0
    peak = 0

    async def work(item: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1

    queue: WorkQueue[int] = WorkQueue(maxsize=2, timeout=0, concurrency_limit=2)
    outcomes = await queue.batch_process(list(range(200)), work)
    assert all(o.ok for o in outcomes)
    assert len(outcomes) == 200
    metrics = queue.metrics
    assert (metrics["processed"], metrics["dropped"], metrics["discarded"]) == (200, 0, 0)
    assert metrics["high_water_mark"] <= 2
    assert peak <= 2


async def test_batch_process_alongside_a_running_queue_does_not_mix_items() -> None:
    main_items: list[int] = []

    async def main_work(item: int) -> None:
        main_items.append(item)

    async def batch_work(item: int) -> int:
        return -item

    async with WorkQueue[int]() as queue:
        await queue.process(main_work)
        await queue.put(1)
        outcomes = await queue.batch_process([2, 3], batch_work)
        await queue.join()
    assert main_items == [1]
    assert [o.result for o in outcomes] == [-2, -3]
    assert queue.metrics["processed"] == 3


async def test_cancelling_batch_process_stops_its_workers() -> None:
    entered = asyncio.Event()

    async def stuck(item: int) -> None:
        entered.set()
        await asyncio.Event().wait()

    queue: WorkQueue[int] = WorkQueue(concurrency_limit=2, grace_period_s=0)
    task = asyncio.create_task(queue.batch_process(range(10), stuck))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("conveyor.local")]
    metrics = queue.metrics
    assert metrics["enqueued"] == metrics["cancelled"] + metrics["discarded"]


async def test_stop_reports_what_it_discarded() -> None:
    queue: WorkQueue[int] = WorkQueue()
    await queue.start()
    for i in range(3):
        await queue.put(i)
    assert await queue.stop(drain=False) == 3
    assert "stopped" in repr(queue)


# -- QueueConfig -------------------------------------------------------------------------------


def test_queue_config_defaults_match_seed_003() -> None:
    config = QueueConfig()
    assert (config.queue_capacity, config.capacity_refresh_time, config.concurrency_limit) == (
        100,
        1.0,
        None,
    )


@pytest.mark.parametrize(
    "field",
    [
        {"queue_capacity": 0},
        {"capacity_refresh_time": 0},
        {"capacity_refresh_time": -1.5},
        {"concurrency_limit": 0},
        {"queue_size": 10},  # a typo is an error, not a silently ignored option
    ],
)
def test_queue_config_refuses_invalid_values(field: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        QueueConfig(**field)  # type: ignore[arg-type]


async def test_work_queue_from_config() -> None:
    queue: WorkQueue[int] = WorkQueue.from_config(
        QueueConfig(queue_capacity=7, concurrency_limit=3)
    )
    assert queue.queue.maxsize == 7
    assert queue.concurrency_limit == 3
    async with queue:
        await queue.process(lambda item: asyncio.sleep(0))
        assert queue.queue.worker_count == 3


def test_local_queue_config_is_not_the_durable_queue_config() -> None:
    assert QueueConfig.__module__ == "conveyor.local.config"
    assert "seed 002" in (QueueConfig.__doc__ or "")
