"""The retry rules the worker relies on: remote exceptions, and jobs stored without options."""

from __future__ import annotations

import pytest

from conveyor.job import FailureReason, Job, RetrySpec
from conveyor.retry import DEFAULT_MAX_ATTEMPTS, GiveUp, RetryDecision, RetryPolicy
from conveyor.worker.interfaces import RemoteError

NOW = 1_700_000_000_000


def job(**fields: object) -> Job:
    fields.setdefault("enqueued_ms", NOW)
    return Job(id="j", task="t", **fields)  # type: ignore[arg-type]


def remote(remote_type: str, delay_s: float | None = None) -> RemoteError:
    return RemoteError(remote_type, "boom", "Traceback ...", delay_s=delay_s)


# -- RemoteError: matched by remote_type, Retry keeps its delay -----------------------------------


@pytest.mark.parametrize(
    ("remote_type", "names", "matches"),
    [
        ("ValueError", ["builtins.ValueError"], True),  # how retry_on=[ValueError] is stored
        ("ValueError", ["ValueError"], True),
        ("pkg.mod.Flaky", ["pkg.mod.Flaky"], True),
        ("pkg.mod.Flaky", ["Flaky"], True),
        ("pkg.mod.Flaky", ["builtins.ValueError"], False),
        ("KeyError", ["builtins.ValueError"], False),
    ],
)
def test_give_up_on_and_retry_on_match_a_remote_error_by_its_remote_type(
    remote_type: str, names: list[str], matches: bool
) -> None:
    gives_up = RetryPolicy(RetrySpec(kind="fixed", give_up_on=tuple(names)), max_attempts=5)
    retries_only = RetryPolicy(RetrySpec(kind="fixed", retry_on=tuple(names)), max_attempts=5)
    exc = remote(remote_type)

    gave_up = gives_up.decide(job(), exc, NOW) == GiveUp(FailureReason.GAVE_UP)
    retried = isinstance(retries_only.decide(job(), exc, NOW), RetryDecision)

    assert gave_up is matches
    assert retried is matches


def test_a_remote_retry_keeps_its_delay_and_passes_a_retry_on_filter() -> None:
    policy = RetryPolicy.fixed(3600, max_attempts=5, retry_on=[KeyError])

    decision = policy.decide(job(), remote("conveyor.retry.Retry", delay_s=2.5), NOW)

    assert decision == RetryDecision(run_at_ms=NOW + 2500)


def test_a_remote_retry_without_a_delay_uses_the_schedule() -> None:
    policy = RetryPolicy.fixed(7, max_attempts=5)
    assert policy.decide(job(), remote("conveyor.retry.Retry"), NOW) == RetryDecision(
        run_at_ms=NOW + 7000
    )


# -- jobs stored without a retry spec take the task's policy --------------------------------------


def test_a_job_with_its_own_spec_keeps_it_and_its_max_attempts() -> None:
    own = RetryPolicy.fixed(5, max_attempts=2)
    task = RetryPolicy.fixed(60, max_attempts=9)

    policy = RetryPolicy.for_job(job(retry=own.spec, max_attempts=2), task)

    assert policy == own


def test_a_job_without_a_spec_takes_the_tasks_policy_and_cap() -> None:
    task = RetryPolicy.fixed(60, max_attempts=9)

    policy = RetryPolicy.for_job(job(retry=None, max_attempts=DEFAULT_MAX_ATTEMPTS), task)

    assert policy == task
    assert policy.decide(job(attempts=3), ValueError(), NOW, max_attempts=policy.max_attempts) == (
        RetryDecision(run_at_ms=NOW + 60_000)
    )


def test_a_cap_the_producer_chose_wins_over_the_tasks() -> None:
    task = RetryPolicy.fixed(60, max_attempts=9)

    policy = RetryPolicy.for_job(job(retry=None, max_attempts=2), task)

    assert (policy.spec, policy.max_attempts) == (task.spec, 2)


def test_a_job_without_a_spec_of_a_task_without_a_policy_gets_the_default() -> None:
    assert RetryPolicy.for_job(job(retry=None)) == RetryPolicy()
