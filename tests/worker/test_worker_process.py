"""Jobs on the process executor: poison jobs, remote exceptions and the retry policy."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import worker_tasks
from worker_helpers import eventually, finished, running

from conveyor import Conveyor, JobState, RetryPolicy
from conveyor.clock import FakeClock
from conveyor.job import FailureReason


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_poison_job_lands_in_dead_letters_after_exactly_max_attempts(
    url_for: Any,
) -> None:
    app = Conveyor(url_for("sqlite"))
    die = app.task(name="p.die", executor="process", retry=RetryPolicy.fixed(0.05, max_attempts=3))(
        worker_tasks.proc_die
    )
    noop = app.task(name="p.noop", executor="process")(worker_tasks.proc_noop)

    async with app:
        poison = await die.enqueue(3)
        others = await app.enqueue_many([noop.request(i) for i in range(1000)])
        async with running(app, concurrency={"process": 2}, scan_interval_s=0.05) as worker:
            (job,) = await finished(app, [poison.id], timeout_s=60)
            rest = await finished(app, [h.id for h in others], timeout_s=60)
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.POISON
    assert job.attempts == 3
    assert "WorkerLostError" in (job.error or "")
    assert {j.state for j in rest} == {JobState.COMPLETED}
    assert [j.result for j in rest] == list(range(1000))
    totals = worker.metrics.totals()
    assert totals["completed"] == 1000
    assert totals["retried"] == 2
    assert totals["dead_lettered"] == 1


async def test_a_process_jobs_exception_is_stored_and_matched_by_the_retry_policy(
    url_for: Any,
) -> None:
    app = Conveyor(url_for("memory"))
    # The child raises ValueError; give_up_on=[ValueError] must see through RemoteError.
    raises = app.task(
        name="p.raise",
        executor="process",
        retry=RetryPolicy.fixed(0, max_attempts=5, give_up_on=[ValueError]),
    )(worker_tasks.proc_raise)

    async with app:
        handle = await raises.enqueue("bad input")
        async with running(app, concurrency={"process": 1}):
            (job,) = await finished(app, [handle.id], timeout_s=30)
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.GAVE_UP
    assert job.attempts == 1
    assert job.error == "ValueError: bad input"
    assert "proc_raise" in (job.traceback or "")


async def test_a_retry_raised_in_a_process_child_keeps_its_delay() -> None:
    clock = FakeClock(start_ms=int(time.time() * 1000))  # frozen: run_at - now is the delay
    app = Conveyor("memory://", clock=clock)
    # The policy's own delay (1 h) would hide the bug: the child's Retry asks for 30 s.
    later = app.task(
        name="p.retry", executor="process", retry=RetryPolicy.fixed(3600, max_attempts=3)
    )(worker_tasks.proc_retry_later)

    async with app:
        handle = await later.enqueue(30)
        async with running(app, concurrency={"process": 1}):
            job = await eventually(
                lambda: _scheduled(app, handle.id), timeout_s=30, what="the retry"
            )
    assert job.attempts == 1
    assert job.run_at_ms - clock.now_ms() == 30_000
    assert job.error is not None
    assert "Retry" in job.error


async def _scheduled(app: Conveyor, job_id: str) -> Any:
    job = await app.broker.get(job_id)
    return job if job is not None and job.state is JobState.SCHEDULED else None


async def test_a_process_job_over_its_timeout_is_stopped(url_for: Any, tmp_path: Any) -> None:
    app = Conveyor(url_for("memory"))
    wait = app.task(name="p.wait", executor="process", timeout_s=0.5, max_attempts=1)(
        worker_tasks.proc_wait
    )
    async with app:
        handle = await wait.enqueue(str(tmp_path / "pid"), 60)
        async with running(app, concurrency={"process": 1}):
            async with asyncio.timeout(30):
                (job,) = await finished(app, [handle.id], timeout_s=30)
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.TIMEOUT
