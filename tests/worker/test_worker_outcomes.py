"""What the worker stores for each kind of run: results, retries, dead letters, callbacks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from worker_helpers import finished, running

from conveyor import Conveyor, JobContext, JobState, Retry, RetryPolicy
from conveyor.job import FailureReason


async def test_jobs_run_and_their_results_are_stored(app_url: str) -> None:
    app = Conveyor(app_url)

    @app.task(name="t.add")
    async def add(a: int, b: int) -> int:
        return a + b

    async with app:
        handles = await app.enqueue_many([add.request(i, i) for i in range(50)])
        async with running(app) as worker:
            jobs = await finished(app, [h.id for h in handles])
        assert [j.result for j in jobs] == [2 * i for i in range(50)]
        assert {j.state for j in jobs} == {JobState.COMPLETED}
        assert {j.attempts for j in jobs} == {1}
        assert worker.metrics.totals()["completed"] == 50


async def test_failing_job_retries_with_backoff_then_dead_letters_with_error_and_traceback(
    app_url: str,
) -> None:
    app = Conveyor(app_url)
    runs: list[float] = []

    @app.task(name="t.boom", retry=RetryPolicy.fixed(0.2, max_attempts=3))
    async def boom(x: int) -> None:
        runs.append(time.monotonic())
        raise ValueError(f"boom {x}")

    async with app:
        handle = await boom.enqueue(7)
        async with running(app, scan_interval_s=0.05):
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.EXHAUSTED
    assert job.attempts == 3
    assert len(runs) == 3
    assert all(b - a >= 0.18 for a, b in itertools.pairwise(runs)), runs
    assert job.error == "ValueError: boom 7"
    assert job.traceback is not None
    assert "Traceback (most recent call last)" in job.traceback
    assert "in boom" in job.traceback
    assert "ValueError: boom 7" in job.traceback


async def test_retry_raised_by_a_task_uses_its_delay(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    runs: list[float] = []

    @app.task(name="t.again", max_attempts=3)
    async def again() -> str:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise Retry(delay_s=0.3)
        return "second time lucky"

    async with app:
        handle = await again.enqueue()
        async with running(app):
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.COMPLETED
    assert job.result == "second time lucky"
    assert job.attempts == 2
    assert runs[1] - runs[0] >= 0.28


async def test_unknown_task_goes_to_dead_letters_at_once_with_system_error(app_url: str) -> None:
    app = Conveyor(app_url)

    @app.task(name="t.known")
    async def known() -> None:
        return None

    async with app:
        handle = await app.enqueue("t.not_registered", args=[1], max_attempts=5)
        async with running(app) as worker:
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.SYSTEM_ERROR
    assert job.attempts == 1  # not retried: no retry can make an unknown task known
    assert "t.not_registered" in (job.error or "")
    assert worker.metrics.totals()["dead_lettered"] == 1


async def test_arguments_that_do_not_fit_the_signature_go_to_dead_letters(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    ran: list[int] = []

    @app.task(name="t.one_arg")
    async def one_arg(x: int) -> None:
        ran.append(x)

    async with app:
        # Enqueued by name, so the client cannot check the signature.
        producer = Conveyor(broker=app.broker)
        handle = await producer.enqueue("t.one_arg", args=[1, 2, 3], max_attempts=5)
        async with running(app):
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.SYSTEM_ERROR
    assert job.attempts == 1
    assert "arguments do not fit" in (job.error or "")
    assert ran == []


async def test_unencodable_result_is_a_failure_with_a_clear_error(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.bad_result", max_attempts=1)
    async def bad_result() -> Any:
        return {1, 2, 3}

    async with app:
        handle = await bad_result.enqueue()
        async with running(app):
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.FAILED
    assert job.error is not None
    assert job.error.startswith("conveyor.errors.UnencodablePayloadError: cannot encode")
    assert "result" in job.error


async def test_timeout_stops_the_run_and_dead_letters_with_reason_timeout(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.slow", timeout_s=0.1, max_attempts=1)
    async def slow() -> None:
        await asyncio.sleep(30)

    async with app:
        handle = await slow.enqueue()
        async with running(app) as worker:
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.TIMEOUT
    assert (job.error or "").startswith("conveyor.worker.interfaces.JobTimeoutError:")
    assert worker.metrics.totals()["timeouts"] == 1


async def test_give_up_on_an_exception_class_dead_letters_at_once(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.give_up", retry=RetryPolicy.fixed(0, max_attempts=5, give_up_on=[KeyError]))
    async def give_up() -> None:
        raise KeyError("missing")

    async with app:
        handle = await give_up.enqueue()
        async with running(app):
            (job,) = await finished(app, [handle.id])
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.GAVE_UP
    assert job.attempts == 1


async def test_callbacks_receive_the_outcome(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    seen: list[dict[str, Any]] = []

    @app.task(name="t.record")
    async def record(outcome: dict[str, Any]) -> None:
        seen.append(outcome)

    @app.task(name="t.ok", on_success="t.record")
    async def ok(x: int) -> int:
        return x * 10

    @app.task(name="t.bad", on_failure="t.record", max_attempts=1)
    async def bad(x: int) -> int:
        raise RuntimeError("no")

    async with app:
        h1 = await ok.enqueue(4)
        h2 = await bad.enqueue(5)
        async with running(app):
            await finished(app, [h1.id, h2.id])
            await asyncio.sleep(0.05)  # callbacks run right after the outcome is stored
    by_task = {o["task"]: o for o in seen}
    assert by_task["t.ok"] == {
        "job_id": h1.id,
        "task": "t.ok",
        "queue": "default",
        "state": "completed",
        "result": 40,
        "error": None,
        "attempts": 1,
        "args": [4],
        "kwargs": {},
    }
    assert by_task["t.bad"]["state"] == "failed"
    assert by_task["t.bad"]["error"] == "RuntimeError: no"
    assert by_task["t.bad"]["attempts"] == 1
    assert by_task["t.bad"]["job_id"] == h2.id


async def test_a_failing_callback_does_not_change_the_outcome(app_url: str) -> None:
    app = Conveyor(app_url)
    calls: list[str] = []

    @app.task(name="t.cb_raises")
    def cb_raises(outcome: dict[str, Any]) -> None:  # a sync callback runs in a thread
        calls.append(outcome["job_id"])
        raise RuntimeError("callback broke")

    @app.task(name="t.fine", on_success="t.cb_raises")
    async def fine() -> str:
        return "fine"

    async with app:
        handle = await fine.enqueue()
        async with running(app) as worker:
            (job,) = await finished(app, [handle.id])
            await asyncio.sleep(0.1)
        assert (await handle.status()).state is JobState.COMPLETED
    assert job.result == "fine"
    assert calls == [handle.id]
    assert worker.metrics.totals()["callback_failures"] == 1


async def test_progress_and_log_lines_are_stored_before_the_outcome(app_url: str) -> None:
    app = Conveyor(app_url)

    @app.task(name="t.chatty")
    async def chatty(ctx: JobContext) -> str:
        ctx.progress(50, "half way")
        ctx.log("hello from", ctx.job_id)
        await asyncio.sleep(0.01)
        ctx.log("bye")
        return "done"

    async with app:
        handle = await chatty.enqueue()
        async with running(app):
            (job,) = await finished(app, [handle.id])
        page = await app.logs(handle.id)
    assert job.progress == 50
    assert job.description == "half way"
    assert page.lines[:2] == [f"hello from {handle.id}", "bye"]


@pytest.mark.parametrize("delay_s", [0.0, 0.3])
async def test_scheduled_jobs_run_when_due(url_for: Any, delay_s: float) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="t.when")
    async def when() -> float:
        return time.time()

    async with app:
        enqueued = time.time()
        handle = await when.options_for_call(delay_s=delay_s).enqueue()
        async with running(app):
            (job,) = await finished(app, [handle.id])
    assert job.result - enqueued >= delay_s - 0.02


async def test_a_thread_jobs_reports_and_logging_reach_the_broker(url_for: Any) -> None:
    app = Conveyor(url_for("sqlite"))

    @app.task(name="t.thread_chatty", executor="thread")
    def thread_chatty(ctx: JobContext, n: int) -> int:
        for i in range(n):
            ctx.progress(100 * (i + 1) // n, f"step {i + 1} of {n}")
        ctx.log("from ctx.log")
        logging.getLogger("user.code").info("from logging: %d", n)
        return n

    async with app:
        handle = await thread_chatty.enqueue(1000)
        async with running(app):
            (job,) = await finished(app, [handle.id])
        page = await app.logs(handle.id)
    assert job.result == 1000
    assert job.progress == 100
    assert job.description == "step 1000 of 1000"
    assert page.lines == ["from ctx.log", "INFO user.code: from logging: 1000"]
