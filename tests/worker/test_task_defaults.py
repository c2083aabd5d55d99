"""Jobs stored without their task's options (enqueued by name elsewhere) run with the task's."""

from __future__ import annotations

import asyncio

from worker_helpers import finished, running

from conveyor import Conveyor, JobState, RetryPolicy
from conveyor.job import FailureReason, Job, new_job_id
from conveyor.retry import DEFAULT_MAX_ATTEMPTS


def by_name(task: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Job:
    """A job as a producer that does not have ``task`` registered stores it (CLI, service)."""
    return Job(
        id=new_job_id(),
        task=task,
        queue="defaults",
        retry=None,
        timeout_s=None,
        max_attempts=max_attempts,
    )


async def test_the_tasks_timeout_and_retry_policy_apply(app_url: str) -> None:
    app = Conveyor(app_url)
    runs: list[int] = []

    @app.task(
        name="d.slow",
        queue="defaults",
        timeout_s=0.2,
        retry=RetryPolicy.fixed(0, max_attempts=2),
    )
    async def slow() -> None:
        runs.append(1)
        await asyncio.sleep(30)

    async with app:
        [job_id] = await app.broker.enqueue([by_name("d.slow")])
        async with running(app):
            (job,) = await finished(app, [job_id], timeout_s=20)
    assert job.state is JobState.FAILED
    assert job.failure_reason == FailureReason.TIMEOUT  # the task's 0.2 s, not "no timeout"
    assert job.attempts == 2  # the task's cap (2), not the stored default (3)
    assert len(runs) == 2


async def test_a_cap_the_producer_set_wins_over_the_tasks(app_url: str) -> None:
    app = Conveyor(app_url)

    @app.task(name="d.fail", queue="defaults", retry=RetryPolicy.fixed(0, max_attempts=5))
    async def fail() -> None:
        raise ValueError("no")

    async with app:
        [job_id] = await app.broker.enqueue([by_name("d.fail", max_attempts=1)])
        async with running(app):
            (job,) = await finished(app, [job_id], timeout_s=20)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert job.failure_reason == FailureReason.EXHAUSTED
