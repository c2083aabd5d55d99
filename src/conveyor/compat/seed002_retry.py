"""Seed 002's ``QueueRetryConfig``: a delay schedule that becomes a conveyor :class:`RetryPolicy`.

The seed stores a retry configuration as a list of delays (``fixed`` repeats one delay,
``exponential`` precomputes ``min_delay * base**n`` capped at ``max_delay``, ``custom`` is the
list as given), a retry count and a total timeout. Here that is exactly what a conveyor
``RetryPolicy.custom`` is, so :meth:`QueueRetryConfig.to_policy` hands the worker a policy that
travels with each job, and :meth:`get_delay_for_attempt` asks that same policy, so the delay the
docs show is the delay the worker waits.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Final

from conveyor.errors import ConfigurationError
from conveyor.retry import RetryPolicy

DEFAULT_MAX_ATTEMPTS: Final = 5
#: Jitter of the exponential schedule (a fraction of each delay, +/-), so that a burst of jobs
#: that failed together does not retry in lockstep. Fixed and custom schedules are exact.
EXPONENTIAL_JITTER: Final = 0.1


def _exponential_delays(base: float, min_delay: float, max_delay: float, count: int) -> list[float]:
    """``min_delay * base**n`` for n = 0..count-1, each capped at ``max_delay``."""
    return [min(max_delay, min_delay * base**n) for n in range(max(1, count))]


class QueueRetryConfig:
    """How often, and after which delays, a failed operation is retried (seed 002's API).

    ``max_attempts`` counts *retries* (the seed's "Maximum 3 retry attempts"), so an operation
    runs at most ``max_attempts + 1`` times; ``delays[i]`` is the wait before retry ``i + 1``
    and retries past the end of the list reuse its last delay. ``timeout`` bounds the whole
    retrying (seconds from enqueue): a retry that would start later is not made and the
    operation goes to ``queue:failures``.

    Args:
        max_attempts: retries allowed after the first run (0 = never retry).
        delays: the delay schedule in seconds (default: exponential 1, 2, 4, ... capped at 60).
        timeout: total seconds after enqueue past which no retry starts (None: no limit).
        jitter: +/- fraction applied to each delay (default: 0.1 for the default exponential
            schedule, else 0 - see :data:`EXPONENTIAL_JITTER`).
    """

    def __init__(
        self,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        delays: Sequence[float] | None = None,
        timeout: float | None = None,
        *,
        jitter: float | None = None,
    ) -> None:
        if not isinstance(max_attempts, int) or max_attempts < 0:
            raise ConfigurationError(f"max_attempts must be an integer >= 0, got {max_attempts!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds when given, got {timeout!r}")
        self.max_attempts = max_attempts
        self.timeout = None if timeout is None else float(timeout)
        if delays is None:
            self.delays = self._generate_exponential_delays()
            default_jitter = EXPONENTIAL_JITTER
        else:
            self.delays = [float(d) for d in delays]
            default_jitter = 0.0
        self.jitter = default_jitter if jitter is None else float(jitter)
        # Building the policy validates delays and jitter with conveyor's own rules, once.
        self._policy = RetryPolicy.custom(
            self.delays or [0.0],
            max_attempts=self.max_attempts + 1,
            deadline_s=self.timeout,
            jitter=self.jitter,
        )

    # -- factories (the seed's classmethods) -----------------------------------------------------

    @classmethod
    def fixed(
        cls, delay: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS, timeout: float | None = None
    ) -> QueueRetryConfig:
        """The same ``delay`` (seconds) before each of ``max_attempts`` retries."""
        return cls(max_attempts, [delay] * max(1, max_attempts), timeout, jitter=0.0)

    @classmethod
    def exponential(
        cls,
        base: float = 2.0,
        min_delay: float = 1.0,
        max_delay: float = 60.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
        *,
        jitter: float = EXPONENTIAL_JITTER,
    ) -> QueueRetryConfig:
        """Delays ``min_delay * base**n`` (n = 0, 1, ...) capped at ``max_delay``, +/- jitter."""
        if base < 1:
            raise ConfigurationError(f"base must be >= 1, got {base}")
        if min_delay < 0 or max_delay < min_delay:
            raise ConfigurationError("need 0 <= min_delay <= max_delay")
        delays = _exponential_delays(base, min_delay, max_delay, max_attempts)
        return cls(max_attempts, delays, timeout, jitter=jitter)

    @classmethod
    def custom(
        cls,
        delays: Sequence[float],
        max_attempts: int | None = None,
        timeout: float | None = None,
    ) -> QueueRetryConfig:
        """An explicit delay schedule; ``max_attempts`` defaults to one retry per delay."""
        if not delays:
            raise ConfigurationError("a custom retry schedule needs at least one delay")
        return cls(
            len(delays) if max_attempts is None else max_attempts, delays, timeout, jitter=0.0
        )

    def _generate_exponential_delays(self) -> list[float]:
        """The default schedule: base 2 from 1 s, capped at 60 s, one delay per retry."""
        return _exponential_delays(2.0, 1.0, 60.0, self.max_attempts)

    # -- behaviour -------------------------------------------------------------------------------

    def get_delay_for_attempt(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry), with jitter.

        This is the worker's own computation (:meth:`RetryPolicy.delay_for`), not a copy of it.
        """
        return self._policy.delay_for(attempt, rng)

    def would_exceed_timeout(
        self, first_attempt_time: float, current_time: float, next_delay: float = 0.0
    ) -> bool:
        """Whether a retry ``next_delay`` seconds after ``current_time`` starts past the timeout.

        Times are epoch seconds; ``first_attempt_time`` is when the operation was enqueued.
        """
        if self.timeout is None:
            return False
        return current_time + next_delay - first_attempt_time > self.timeout

    def to_policy(self) -> RetryPolicy:
        """The conveyor policy stored with each job (``max_attempts + 1`` runs in all)."""
        return self._policy

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; :meth:`from_dict` reads it back."""
        return {
            "max_attempts": self.max_attempts,
            "delays": list(self.delays),
            "timeout": self.timeout,
            "jitter": self.jitter,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QueueRetryConfig:
        """Rebuild from :meth:`to_dict`'s form (``jitter`` may be absent, as in the seed's)."""
        return cls(
            max_attempts=int(data.get("max_attempts", DEFAULT_MAX_ATTEMPTS)),
            delays=data.get("delays"),
            timeout=data.get("timeout"),
            jitter=data.get("jitter"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QueueRetryConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.max_attempts, tuple(self.delays), self.timeout, self.jitter))

    def __repr__(self) -> str:
        return (
            f"QueueRetryConfig(max_attempts={self.max_attempts}, delays={self.delays}, "
            f"timeout={self.timeout}, jitter={self.jitter})"
        )
