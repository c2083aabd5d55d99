"""The app object: task registration, per-call options, enqueue, handles, waiting, sync client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor import Conveyor, JobContext, JobState, Priority, RetryPolicy
from conveyor.errors import (
    ConfigurationError,
    InvalidJobError,
    JobFailed,
    JobTimeout,
    UnencodablePayloadError,
)
from conveyor.job import FailureReason


def make_app() -> Conveyor:
    return Conveyor("memory://")


async def send(to: str, subject: str = "hi") -> str:
    return f"{to}:{subject}"


def resize(path: str, width: int) -> int:
    return width


async def with_ctx(ctx: JobContext, n: int) -> int:
    ctx.progress(50)
    return n


def test_executor_defaults_follow_the_function_kind() -> None:
    app = make_app()
    assert app.task(send).options.executor == "async"
    assert app.task(resize).options.executor == "thread"


def test_task_name_defaults_to_module_and_qualname() -> None:
    app = make_app()
    assert app.task(send).name == f"{__name__}.send"


def test_duplicate_task_name_is_refused() -> None:
    app = make_app()
    app.task(name="x")(send)
    with pytest.raises(ConfigurationError, match="already registered"):
        app.task(name="x")(resize)


def test_sync_function_cannot_use_the_async_executor() -> None:
    with pytest.raises(ConfigurationError, match="executor='thread'"):
        make_app().task(executor="async")(resize)


def test_process_tasks_must_be_importable() -> None:
    def local(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="module level"):
        make_app().task(executor="process")(local)


def test_context_parameter_is_not_part_of_the_enqueue_signature() -> None:
    task = make_app().task(with_ctx)
    assert task.takes_context
    assert list(task.signature.parameters) == ["n"]


async def test_enqueue_stores_task_options_and_per_call_overrides() -> None:
    app = make_app()
    task = app.task(queue="mail", priority="high", timeout_s=5, retry=RetryPolicy.fixed(3))(send)
    async with app:
        handle = await task.enqueue("a@b", subject="s")
        job = await handle.status()
        assert (job.task, job.queue, job.priority, job.timeout_s) == (
            task.name,
            "mail",
            Priority.HIGH,
            5,
        )
        assert job.args == ["a@b"]
        assert job.kwargs == {"subject": "s"}
        assert job.state is JobState.QUEUED
        assert job.retry == RetryPolicy.fixed(3).spec
        later = await task.options_for_call(delay_s=60, priority="low", max_attempts=7).enqueue("c")
        job2 = await later.status()
        assert job2.state is JobState.SCHEDULED
        assert job2.priority is Priority.LOW
        assert job2.max_attempts == 7
        assert job2.run_at_ms >= job2.enqueued_ms + 60_000


async def test_arguments_that_do_not_fit_the_signature_are_refused_before_writing() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        with pytest.raises(InvalidJobError, match="arguments do not fit"):
            await task.enqueue()  # type: ignore[call-arg]
        assert sum(sum(c.values()) for c in (await app.counts()).values()) == 0


async def test_unencodable_argument_is_refused_naming_it() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        with pytest.raises(UnencodablePayloadError, match="object"):
            await task.enqueue(object())  # type: ignore[arg-type]


async def test_dedup_key_returns_the_live_jobs_handle() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        first = await task.options_for_call(dedup_key="k").enqueue("a")
        second = await task.options_for_call(dedup_key="k").enqueue("b")
        assert first == second


async def test_enqueue_many_writes_a_batch_in_one_call() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        handles = await app.enqueue_many([task.request(f"u{i}") for i in range(50)])
        assert len({h.id for h in handles}) == 50
        assert (await app.counts())["default"][JobState.QUEUED] == 50


async def test_enqueue_by_name_of_a_task_this_process_does_not_have() -> None:
    app = make_app()
    async with app:
        handle = await app.enqueue("other.service.task", args=[1])
        job = await handle.status()
        assert job.task == "other.service.task"
        # left unset so the worker that has the task applies the task's own policy and timeout
        assert job.retry is None
        assert job.timeout_s is None
        explicit = await app.enqueue("other.service.task", max_attempts=9, timeout_s=4)
        job = await explicit.status()
        assert (job.max_attempts, job.timeout_s) == (9, 4)


async def test_pending_job_waits_for_start() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        handle = await task.options_for_call(pending=True).enqueue("a")
        assert (await handle.status()).state is JobState.PENDING
        await app.start(handle.id)
        assert (await handle.status()).state is JobState.QUEUED


async def test_result_waits_for_completion_through_events() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        handle = await task.enqueue("a")

        async def complete_soon() -> None:
            await asyncio.sleep(0.05)
            [job] = await app.broker.reserve("default", 1, lease_s=10)
            await app.broker.ack(job.lease, "done")

        finisher = asyncio.create_task(complete_soon())
        assert await handle.result(timeout_s=5) == "done"
        await finisher


async def test_result_of_a_dead_lettered_job_raises_job_failed_with_its_error() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        handle = await task.enqueue("a")
        [job] = await app.broker.reserve("default", 1, lease_s=10)
        await app.broker.dead_letter(job.lease, reason=FailureReason.EXHAUSTED, error="Boom: x")
        with pytest.raises(JobFailed, match="Boom: x"):
            await handle.result(timeout_s=5)


async def test_result_times_out_with_job_timeout() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        handle = await task.enqueue("a")
        with pytest.raises(JobTimeout):
            await handle.result(timeout_s=0.1)


async def test_cancel_through_the_handle_stops_the_job() -> None:
    app = make_app()
    task = app.task(send)
    async with app:
        handle = await task.enqueue("a")
        assert (await handle.cancel()).state is JobState.STOPPED


def test_sync_client_refuses_memory_broker() -> None:
    with pytest.raises(ConfigurationError, match="memory://"):
        _ = make_app().sync


def test_sync_client_drives_the_same_api_on_sqlite(tmp_path: Path) -> None:
    app = Conveyor(f"sqlite:///{tmp_path / 'q.db'}")
    task = app.task(send)
    with app.sync as client:
        job_id = task.enqueue_sync("a", subject="z")
        job = client.get_job(job_id)
        assert job is not None
        assert job.kwargs == {"subject": "z"}
        assert client.counts()["default"][JobState.QUEUED] == 1
        assert client.cancel(job_id).state is JobState.STOPPED
