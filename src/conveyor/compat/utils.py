"""Seed 002's resilience decorators: ``with_timeout``, ``circuit_breaker``, ``retry_with_backoff``.

They are small and independent of the queue: use them on your own code (an HTTP call inside a
processor, say). Each works bare (``@circuit_breaker``) or with arguments
(``@circuit_breaker(failure_threshold=3)``). ``circuit_breaker`` and ``retry_with_backoff`` wrap
both ``async def`` and plain functions; ``with_timeout`` wraps only ``async def``, because a
running thread cannot be stopped from outside - for sync work with a time limit, enqueue it as a
job with a ``timeout`` (the worker's thread executor enforces it).

Retrying *jobs* is the worker's business (:class:`~conveyor.compat.QueueRetryConfig`); these
decorators retry a call inside one run.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, cast, overload

from conveyor.errors import ConfigurationError, ConveyorError

__all__ = [
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "circuit_breaker",
    "retry_with_backoff",
    "with_timeout",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TIMEOUT_S = 30.0


# -- with_timeout --------------------------------------------------------------------------------


@overload
def with_timeout(
    fn: Callable[P, Coroutine[Any, Any, R]], /
) -> Callable[P, Coroutine[Any, Any, R]]: ...


@overload
def with_timeout(
    timeout_s: float = DEFAULT_TIMEOUT_S, /
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], Callable[P, Coroutine[Any, Any, R]]]: ...


def with_timeout(fn_or_timeout: Any = DEFAULT_TIMEOUT_S, /) -> Any:
    """Fail an ``async def`` call with :class:`TimeoutError` after ``timeout_s`` (default 30 s).

    ``@with_timeout`` or ``@with_timeout(5.0)``. The call is cancelled at its next ``await``,
    so its ``finally`` blocks and context managers run.
    """
    if callable(fn_or_timeout):
        return _apply_timeout(fn_or_timeout, DEFAULT_TIMEOUT_S)
    timeout_s = float(fn_or_timeout)
    if not timeout_s > 0:
        raise ConfigurationError(f"with_timeout needs a timeout > 0 seconds, got {fn_or_timeout!r}")
    return functools.partial(_apply_timeout, timeout_s=timeout_s)


def _apply_timeout(
    fn: Callable[P, Coroutine[Any, Any, R]], timeout_s: float
) -> Callable[P, Coroutine[Any, Any, R]]:
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"with_timeout wraps async functions only, and {fn.__qualname__} is not one: a thread "
            "cannot be stopped from outside. Run sync work as a job with a timeout instead."
        )

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            async with asyncio.timeout(timeout_s):
                return await fn(*args, **kwargs)
        except TimeoutError:
            raise TimeoutError(f"{fn.__qualname__} did not finish within {timeout_s} s") from None

    return wrapper


# -- circuit_breaker -----------------------------------------------------------------------------


class CircuitOpenError(ConveyorError):
    """The circuit is open after repeated failures; calls fail fast until its recovery time."""


class CircuitState(enum.StrEnum):
    """A breaker's state: ``closed`` (calls pass), ``open`` (they fail fast), ``half_open``."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one function and fails fast once they reach a threshold.

    After ``recovery_timeout_s`` in the open state one trial call is let through (half-open):
    its success closes the circuit, its failure opens it again. Thread-safe, so one breaker may
    guard a function called from several worker threads.

    Args:
        name: shown in errors and logs.
        failure_threshold: consecutive failures that open the circuit.
        recovery_timeout_s: how long it stays open before a trial call.
        expected_exceptions: the exception classes that count as failures (others pass through
            without touching the count).
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        recovery_timeout_s: float = 30.0,
        expected_exceptions: tuple[type[BaseException], ...] = (Exception,),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigurationError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if recovery_timeout_s < 0:
            raise ConfigurationError(f"recovery_timeout_s must be >= 0, got {recovery_timeout_s}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout_s = recovery_timeout_s
        self.expected_exceptions = expected_exceptions
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> CircuitState:
        """The current state (an open circuit whose recovery time has passed reads half-open)."""
        with self._lock:
            return self._state_locked()

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far."""
        return self._failures

    def _state_locked(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self.recovery_timeout_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def before_call(self) -> None:
        """Raise :class:`CircuitOpenError` if the call may not go through now."""
        with self._lock:
            state = self._state_locked()
            if state is CircuitState.CLOSED:
                return
            # Half-open lets exactly one trial through; concurrent callers still fail fast.
            if state is CircuitState.HALF_OPEN and not self._trial_running:
                self._trial_running = True
                return
            assert self._opened_at is not None
            retry_in = max(0.0, self.recovery_timeout_s - (self._clock() - self._opened_at))
        raise CircuitOpenError(
            f"circuit {self.name!r} is open after {self._failures} consecutive failures; "
            f"calls fail fast for another {retry_in:.1f} s"
        )

    def record_success(self) -> None:
        """Close the circuit and reset the count."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial_running = False

    def record_failure(self, exc: BaseException) -> None:
        """Count a failure if ``exc`` is expected; open the circuit at the threshold."""
        if not isinstance(exc, self.expected_exceptions):
            with self._lock:
                self._trial_running = False
            return
        with self._lock:
            self._failures += 1
            was_trial, self._trial_running = self._trial_running, False
            if was_trial or self._failures >= self.failure_threshold:
                if self._opened_at is None or was_trial:
                    logger.warning(
                        "circuit %s opened after %d consecutive failures",
                        self.name,
                        self._failures,
                        extra={"action": "circuit_open"},
                    )
                self._opened_at = self._clock()

    def reset(self) -> None:
        """Close the circuit (for tests and operators)."""
        self.record_success()


@overload
def circuit_breaker(fn: F, /) -> F: ...


@overload
def circuit_breaker(
    *,
    failure_threshold: int = 5,
    recovery_timeout_s: float = 30.0,
    expected_exceptions: tuple[type[BaseException], ...] = (Exception,),
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[F], F]: ...


def circuit_breaker(
    fn: F | None = None,
    /,
    *,
    failure_threshold: int = 5,
    recovery_timeout_s: float = 30.0,
    expected_exceptions: tuple[type[BaseException], ...] = (Exception,),
    clock: Callable[[], float] = time.monotonic,
) -> F | Callable[[F], F]:
    """Guard a function (sync or async) with its own :class:`CircuitBreaker`.

    ``@circuit_breaker`` or ``@circuit_breaker(failure_threshold=3, recovery_timeout_s=10)``.
    The breaker is reachable as ``fn.breaker`` (to read its state or reset it).
    """

    def decorate(f: F) -> F:
        breaker = CircuitBreaker(
            f.__qualname__,
            failure_threshold=failure_threshold,
            recovery_timeout_s=recovery_timeout_s,
            expected_exceptions=expected_exceptions,
            clock=clock,
        )
        if inspect.iscoroutinefunction(f):

            @functools.wraps(f)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                breaker.before_call()
                try:
                    result = await f(*args, **kwargs)
                except BaseException as exc:
                    breaker.record_failure(exc)
                    raise
                breaker.record_success()
                return result

            wrapper: Any = async_wrapper
        else:

            @functools.wraps(f)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                breaker.before_call()
                try:
                    result = f(*args, **kwargs)
                except BaseException as exc:
                    breaker.record_failure(exc)
                    raise
                breaker.record_success()
                return result

            wrapper = sync_wrapper
        wrapper.breaker = breaker
        return cast(F, wrapper)

    return decorate(fn) if fn is not None else decorate


# -- retry_with_backoff --------------------------------------------------------------------------


@overload
def retry_with_backoff(fn: F, /) -> F: ...


@overload
def retry_with_backoff(
    *,
    max_attempts: int = 3,
    base_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
    jitter: float = 0.1,
) -> Callable[[F], F]: ...


def retry_with_backoff(
    fn: F | None = None,
    /,
    *,
    max_attempts: int = 3,
    base_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    exceptions: tuple[type[BaseException], ...] = (Exception,),
    jitter: float = 0.1,
) -> F | Callable[[F], F]:
    """Call again after ``base_delay_s * 2**n`` (capped, +/- jitter) when it raises ``exceptions``.

    ``@retry_with_backoff`` or ``@retry_with_backoff(max_attempts=5, exceptions=(OSError,))``.
    ``max_attempts`` counts every call, the first included; the last failure is re-raised.
    An async function waits with ``asyncio.sleep`` (never blocking the loop); a sync one with
    ``time.sleep``, so call it from a thread (as the worker's thread executor does), not from
    the event loop. A :class:`CircuitOpenError` is never retried: the circuit asks callers to
    back off.
    """
    backoff = _Backoff(max_attempts, base_delay_s, max_delay_s, exceptions, jitter)

    def decorate(f: F) -> F:
        return cast(
            F,
            _retry_async(f, backoff) if inspect.iscoroutinefunction(f) else _retry_sync(f, backoff),
        )

    return decorate(fn) if fn is not None else decorate


class _Backoff:
    """The settings of one ``retry_with_backoff``: which failures to retry, and how long to wait."""

    def __init__(
        self,
        max_attempts: int,
        base_delay_s: float,
        max_delay_s: float,
        exceptions: tuple[type[BaseException], ...],
        jitter: float,
    ) -> None:
        if max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {max_attempts}")
        if base_delay_s < 0 or max_delay_s < base_delay_s:
            raise ConfigurationError("need 0 <= base_delay_s <= max_delay_s")
        if not 0 <= jitter <= 1:
            raise ConfigurationError(f"jitter must be between 0 and 1, got {jitter}")
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.exceptions = exceptions
        self.jitter = jitter

    def delay(self, failed: int) -> float:
        """Seconds to wait after the ``failed``-th failed call."""
        d = min(self.max_delay_s, self.base_delay_s * 2.0 ** (failed - 1))
        if self.jitter:
            d *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, d)

    def retries(self, attempt: int, exc: BaseException, fn: Callable[..., Any]) -> bool:
        """Whether to call again after call number ``attempt`` raised ``exc`` (logs if so)."""
        if attempt >= self.max_attempts or isinstance(exc, CircuitOpenError):
            return False
        if not isinstance(exc, self.exceptions):
            return False
        logger.info(
            "%s failed (attempt %d: %s); retrying",
            fn.__qualname__,
            attempt,
            exc,
            extra={"action": "retry_with_backoff"},
        )
        return True


def _retry_async(f: Callable[..., Any], backoff: _Backoff) -> Callable[..., Any]:
    af = cast(Callable[..., Awaitable[Any]], f)

    @functools.wraps(f)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        attempt = 1
        while True:
            try:
                return await af(*args, **kwargs)
            except BaseException as exc:
                if not backoff.retries(attempt, exc, f):
                    raise
            await asyncio.sleep(backoff.delay(attempt))
            attempt += 1

    return wrapper


def _retry_sync(f: Callable[..., Any], backoff: _Backoff) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        attempt = 1
        while True:
            try:
                return f(*args, **kwargs)
            except BaseException as exc:
                if not backoff.retries(attempt, exc, f):
                    raise
            time.sleep(backoff.delay(attempt))
            attempt += 1

    return wrapper
