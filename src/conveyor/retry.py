"""Retry policies: pure decisions of whether and when a failed job runs again.

A :class:`RetryPolicy` is stored with each job as a :class:`~conveyor.job.RetrySpec`, so a policy
set at enqueue time travels with the job to whichever worker runs it. The worker asks
:meth:`RetryPolicy.decide` after a failure and commits the answer through the broker
(``retry`` or ``dead_letter``); nothing here does I/O.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Final

import msgspec

from conveyor.errors import ConfigurationError
from conveyor.job import FailureReason, Job, RetrySpec

DEFAULT_MAX_ATTEMPTS: Final = 3


class Retry(Exception):
    """Raised by a task to ask for another attempt, optionally after ``delay_s`` seconds.

    The attempt is charged; once attempts are spent the job goes to dead letters as usual.
    """

    def __init__(self, delay_s: float | None = None, reason: str | None = None) -> None:
        super().__init__(reason or "retry requested by the task")
        self.delay_s = delay_s


class RetryDecision(msgspec.Struct, frozen=True):
    """Run again at ``run_at_ms`` (epoch ms)."""

    run_at_ms: int


class GiveUp(msgspec.Struct, frozen=True):
    """Stop: the job goes to dead letters with ``reason``."""

    reason: FailureReason


def _qualname(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _remote_type(exc: BaseException) -> str | None:
    """The class name a process child's exception carries (``RemoteError.remote_type``)."""
    remote = getattr(exc, "remote_type", None)
    return remote if isinstance(remote, str) else None


def _matches(exc: BaseException, names: Sequence[str]) -> bool:
    """Whether ``exc`` is an instance of a class named in ``names`` (by qualified or bare name).

    A process child's exception (a ``RemoteError``) also matches by the class it names in
    ``remote_type`` (qualified, ``builtins.`` implied for bare builtins, or bare). Only by name:
    the worker's runner hands the policy a stand-in of the original class when that class is
    loaded, so that base classes match too.
    """
    for klass in type(exc).__mro__:
        if _qualname(klass) in names or klass.__qualname__ in names:
            return True
    remote = _remote_type(exc)
    if remote is not None:
        qualified = remote if "." in remote else f"builtins.{remote}"
        return qualified in names or remote.rpartition(".")[2] in names
    return False


def _is_retry(exc: BaseException) -> bool:
    """Whether ``exc`` is a :class:`Retry`, raised here or in a process child."""
    return isinstance(exc, Retry) or _remote_type(exc) == _qualname(Retry)


class RetryPolicy:
    """When a failed job runs again: a delay schedule, jitter, attempt cap and a total deadline.

    Build one with :meth:`fixed`, :meth:`exponential` or :meth:`custom`. ``max_attempts`` counts
    every run, the first included (``max_attempts=1`` never retries).

    Args:
        spec: the stored form.
        max_attempts: runs allowed in all.
    """

    def __init__(self, spec: RetrySpec | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        if max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {max_attempts}")
        self.spec = spec or RetrySpec()
        self.max_attempts = max_attempts

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def fixed(
        cls,
        delay_s: float,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        deadline_s: float | None = None,
        jitter: float = 0.0,
        retry_on: Sequence[type[BaseException]] = (),
        give_up_on: Sequence[type[BaseException]] = (),
    ) -> RetryPolicy:
        """The same delay before every retry."""
        _check_delay(delay_s, "delay_s")
        return cls(
            _spec("fixed", deadline_s, jitter, retry_on, give_up_on, delay_s=delay_s), max_attempts
        )

    @classmethod
    def exponential(
        cls,
        *,
        base: float = 2.0,
        min_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        deadline_s: float | None = None,
        jitter: float = 0.1,
        retry_on: Sequence[type[BaseException]] = (),
        give_up_on: Sequence[type[BaseException]] = (),
    ) -> RetryPolicy:
        """Delays ``min_delay_s * base**(n-1)`` for retry n, capped at ``max_delay_s``."""
        if base < 1:
            raise ConfigurationError(f"base must be >= 1, got {base}")
        _check_delay(min_delay_s, "min_delay_s")
        _check_delay(max_delay_s, "max_delay_s")
        if max_delay_s < min_delay_s:
            raise ConfigurationError("max_delay_s must be >= min_delay_s")
        spec = _spec(
            "exponential",
            deadline_s,
            jitter,
            retry_on,
            give_up_on,
            base=base,
            min_delay_s=min_delay_s,
            max_delay_s=max_delay_s,
        )
        return cls(spec, max_attempts)

    @classmethod
    def custom(
        cls,
        delays_s: Sequence[float],
        *,
        max_attempts: int | None = None,
        deadline_s: float | None = None,
        jitter: float = 0.0,
        retry_on: Sequence[type[BaseException]] = (),
        give_up_on: Sequence[type[BaseException]] = (),
    ) -> RetryPolicy:
        """An explicit list of delays; retries past its end reuse the last delay.

        ``max_attempts`` defaults to ``len(delays_s) + 1`` (one first run, then one per delay).
        """
        if not delays_s:
            raise ConfigurationError("custom retry needs at least one delay")
        for d in delays_s:
            _check_delay(d, "delays_s")
        spec = _spec("custom", deadline_s, jitter, retry_on, give_up_on, delays_s=tuple(delays_s))
        return cls(spec, max_attempts if max_attempts is not None else len(delays_s) + 1)

    @classmethod
    def none(cls) -> RetryPolicy:
        """Never retry: one attempt, then dead letters."""
        return cls(RetrySpec(kind="fixed", delay_s=0.0, jitter=0.0), max_attempts=1)

    # -- behaviour -------------------------------------------------------------------------------

    def delay_for(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds before retry number ``retry_number`` (1 = the first retry), with jitter."""
        spec = self.spec
        n = max(1, retry_number)
        if spec.kind == "fixed":
            delay = spec.delay_s
        elif spec.kind == "custom":
            delay = spec.delays_s[min(n, len(spec.delays_s)) - 1]
        else:
            delay = min(spec.max_delay_s, spec.min_delay_s * spec.base ** (n - 1))
        if spec.jitter > 0 and delay > 0:
            r = (rng or random).uniform(-spec.jitter, spec.jitter)
            delay = max(0.0, delay * (1.0 + r))
        return delay

    def decide(
        self,
        job: Job,
        exc: BaseException,
        now_ms: int,
        *,
        timed_out: bool = False,
        rng: random.Random | None = None,
        max_attempts: int | None = None,
    ) -> RetryDecision | GiveUp:
        """Decide what happens after ``job``'s current attempt (``job.attempts + 1``) failed.

        Order: a give-up-on class ends it; with a retry-on list, other classes end it; spent
        attempts end it; a delay past the total deadline ends it; else retry after the delay
        (a :class:`Retry` raised by the task overrides the delay, also from a process child).
        Attempts are capped by ``max_attempts`` when given (see :meth:`for_job`), else by
        ``job.max_attempts``.
        """
        spec = self.spec
        is_retry = _is_retry(exc)
        if spec.give_up_on and _matches(exc, spec.give_up_on):
            return GiveUp(FailureReason.GAVE_UP)
        if spec.retry_on and not is_retry and not _matches(exc, spec.retry_on):
            return GiveUp(FailureReason.GAVE_UP)
        attempt = job.attempts + 1
        cap = job.max_attempts if max_attempts is None else max_attempts
        if attempt >= cap:
            return GiveUp(FailureReason.TIMEOUT if timed_out else FailureReason.EXHAUSTED)
        requested = getattr(exc, "delay_s", None) if is_retry else None
        if isinstance(requested, int | float) and not isinstance(requested, bool):
            delay_s = max(0.0, float(requested))
        else:
            delay_s = self.delay_for(attempt, rng)
        run_at = now_ms + int(delay_s * 1000)
        if spec.deadline_s is not None and run_at > job.enqueued_ms + int(spec.deadline_s * 1000):
            return GiveUp(FailureReason.EXHAUSTED)
        return RetryDecision(run_at_ms=run_at)

    @classmethod
    def for_job(cls, job: Job, task_policy: RetryPolicy | None = None) -> RetryPolicy:
        """The policy that decides ``job``'s retries; its ``max_attempts`` is the attempt cap.

        A job stored with a retry spec carries its own policy: that spec, capped at
        ``job.max_attempts``. A job stored without one (``retry=None``: enqueued by task name
        from a process where the task is not registered, such as the CLI or the HTTP service)
        gets ``task_policy``, the policy the worker's registered task declares (the default
        exponential policy if it declares none), with that policy's ``max_attempts`` as the cap,
        unless the producer chose a cap: a stored ``max_attempts`` other than
        :data:`DEFAULT_MAX_ATTEMPTS` (what a producer stores when given none) wins. So an
        explicit ``max_attempts`` equal to the default defers to the task too; pass ``retry=``
        to pin a job's whole policy. (The broker's crash recovery, ``requeue_expired``, only
        knows the stored ``max_attempts``.)
        """
        if job.retry is not None:
            return cls(job.retry, max(1, job.max_attempts))
        policy = task_policy or cls()
        if job.max_attempts != DEFAULT_MAX_ATTEMPTS:
            return cls(policy.spec, max(1, job.max_attempts))
        return policy

    def __repr__(self) -> str:
        return f"RetryPolicy({self.spec!r}, max_attempts={self.max_attempts})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RetryPolicy):
            return NotImplemented
        return self.spec == other.spec and self.max_attempts == other.max_attempts

    def __hash__(self) -> int:
        return hash((self.spec, self.max_attempts))


def _check_delay(value: float, name: str) -> None:
    if not isinstance(value, int | float) or value < 0:
        raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")


def _spec(
    kind: str,
    deadline_s: float | None,
    jitter: float,
    retry_on: Sequence[type[BaseException]],
    give_up_on: Sequence[type[BaseException]],
    **fields: float | tuple[float, ...],
) -> RetrySpec:
    if deadline_s is not None and deadline_s <= 0:
        raise ConfigurationError(f"deadline_s must be > 0 when given, got {deadline_s}")
    if not 0 <= jitter <= 1:
        raise ConfigurationError(f"jitter must be between 0 and 1, got {jitter}")
    return RetrySpec(
        kind=kind,
        deadline_s=deadline_s,
        jitter=jitter,
        retry_on=tuple(_qualname(c) for c in retry_on),
        give_up_on=tuple(_qualname(c) for c in give_up_on),
        **fields,  # type: ignore[arg-type]
    )
