"""RetryPolicy: schedules, jitter bounds, attempt caps, deadlines, exception filters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.errors import ConfigurationError
from conveyor.job import FailureReason, Job
from conveyor.retry import GiveUp, Retry, RetryDecision, RetryPolicy

NOW = 1_700_000_000_000


def job(attempts: int = 0, max_attempts: int = 5, enqueued_ms: int = NOW) -> Job:
    return Job(
        id="j", task="t", attempts=attempts, max_attempts=max_attempts, enqueued_ms=enqueued_ms
    )


def test_fixed_policy_uses_the_same_delay_every_time() -> None:
    policy = RetryPolicy.fixed(30, max_attempts=3)
    assert [policy.delay_for(n) for n in (1, 2, 3)] == [30, 30, 30]


def test_exponential_policy_grows_from_min_and_caps_at_max() -> None:
    policy = RetryPolicy.exponential(base=2, min_delay_s=1, max_delay_s=10, jitter=0)
    assert [policy.delay_for(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_custom_policy_follows_the_list_then_repeats_the_last_delay() -> None:
    policy = RetryPolicy.custom([60, 300, 1800])
    assert policy.max_attempts == 4
    assert [policy.delay_for(n) for n in range(1, 6)] == [60, 300, 1800, 1800, 1800]


@given(st.integers(min_value=1, max_value=50), st.floats(min_value=0, max_value=1))
def test_jitter_stays_within_its_fraction(retry_number: int, jitter: float) -> None:
    policy = RetryPolicy.exponential(min_delay_s=1, max_delay_s=100, jitter=jitter)
    plain = RetryPolicy.exponential(min_delay_s=1, max_delay_s=100, jitter=0).delay_for(
        retry_number
    )
    delay = policy.delay_for(retry_number, random.Random(retry_number))
    assert plain * (1 - jitter) - 1e-9 <= delay <= plain * (1 + jitter) + 1e-9


def test_decide_retries_until_attempts_are_spent_then_gives_up() -> None:
    policy = RetryPolicy.fixed(2, max_attempts=3)
    first = policy.decide(job(attempts=0, max_attempts=3), ValueError("x"), NOW)
    assert first == RetryDecision(run_at_ms=NOW + 2000)
    second = policy.decide(job(attempts=1, max_attempts=3), ValueError("x"), NOW)
    assert isinstance(second, RetryDecision)
    last = policy.decide(job(attempts=2, max_attempts=3), ValueError("x"), NOW)
    assert last == GiveUp(FailureReason.EXHAUSTED)


def test_a_timeout_on_the_last_attempt_is_reported_as_timeout() -> None:
    policy = RetryPolicy.fixed(1, max_attempts=1)
    assert policy.decide(job(0, 1), TimeoutError(), NOW, timed_out=True) == GiveUp(
        FailureReason.TIMEOUT
    )


def test_give_up_on_ends_at_once_for_that_exception_class_and_subclasses() -> None:
    policy = RetryPolicy.fixed(1, max_attempts=5, give_up_on=[LookupError])
    assert policy.decide(job(), KeyError("k"), NOW) == GiveUp(FailureReason.GAVE_UP)
    assert isinstance(policy.decide(job(), ValueError("v"), NOW), RetryDecision)


def test_retry_on_retries_only_the_named_classes() -> None:
    policy = RetryPolicy.fixed(1, max_attempts=5, retry_on=[ConnectionError])
    assert isinstance(policy.decide(job(), ConnectionResetError(), NOW), RetryDecision)
    assert policy.decide(job(), ValueError(), NOW) == GiveUp(FailureReason.GAVE_UP)


def test_retry_exception_overrides_the_delay() -> None:
    policy = RetryPolicy.fixed(100, max_attempts=5)
    assert policy.decide(job(), Retry(delay_s=0.5), NOW) == RetryDecision(run_at_ms=NOW + 500)


def test_a_retry_past_the_total_deadline_gives_up() -> None:
    policy = RetryPolicy.fixed(60, max_attempts=10, deadline_s=90)
    assert isinstance(policy.decide(job(enqueued_ms=NOW), ValueError(), NOW), RetryDecision)
    late = NOW + 60_000
    assert policy.decide(job(enqueued_ms=NOW), ValueError(), late) == GiveUp(
        FailureReason.EXHAUSTED
    )


def test_policy_round_trips_through_the_job_record() -> None:
    policy = RetryPolicy.exponential(base=3, min_delay_s=2, max_delay_s=50, max_attempts=4)
    stored = Job(id="j", task="t", retry=policy.spec, max_attempts=4)
    assert RetryPolicy.for_job(stored) == policy


@pytest.mark.parametrize(
    "build",
    [
        lambda: RetryPolicy.fixed(-1),
        lambda: RetryPolicy.exponential(base=0.5),
        lambda: RetryPolicy.exponential(min_delay_s=10, max_delay_s=1),
        lambda: RetryPolicy.custom([]),
        lambda: RetryPolicy.fixed(1, max_attempts=0),
        lambda: RetryPolicy.fixed(1, jitter=2),
        lambda: RetryPolicy.fixed(1, deadline_s=0),
    ],
)
def test_invalid_policies_are_refused_with_a_configuration_error(build: object) -> None:
    with pytest.raises(ConfigurationError):
        build()  # type: ignore[operator]
