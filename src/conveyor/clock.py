"""Time as conveyor sees it: a Clock protocol, the system clock, and a fake for tests."""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """A source of wall-clock time in epoch milliseconds.

    Brokers take a clock so that lease expiry and schedules can be tested without sleeping.
    """

    def now_ms(self) -> int:
        """Current time, integer epoch milliseconds."""
        ...


class SystemClock:
    """The real wall clock."""

    def now_ms(self) -> int:
        """Current time, integer epoch milliseconds."""
        return time.time_ns() // 1_000_000


class FakeClock:
    """A clock that only moves when told to; for tests of leases and schedules."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        """Current fake time."""
        return self._now_ms

    def advance(self, seconds: float = 0.0, *, ms: int = 0) -> int:
        """Move time forward by ``seconds`` (and/or ``ms``); returns the new time."""
        self._now_ms += int(seconds * 1000) + ms
        return self._now_ms

    def set(self, now_ms: int) -> None:
        """Set the current time."""
        self._now_ms = now_ms
