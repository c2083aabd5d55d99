"""Circuit breaker and capped exponential backoff for the worker's broker calls.

Each worker loop (fetcher, reaper, heartbeat, committer) owns one :class:`Circuit`. A
:class:`~conveyor.errors.BrokerUnavailable` opens it: the loop waits the delay it returns
(0.1 s doubling to a 2 s cap, so consumption resumes within ~2 s of the broker returning) and
tries again; the next success closes it. State changes are logged once each, never per failure,
so an outage of an hour is two log lines, not thousands.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Final

logger = logging.getLogger(__name__)

BACKOFF_START_S: Final = 0.1
BACKOFF_CAP_S: Final = 2.0

CLOSED: Final = "closed"
OPEN: Final = "open"


class Backoff:
    """Capped exponential delays with +/-10 % jitter (so a fleet does not retry in lockstep).

    Args:
        start_s: the first delay.
        cap_s: the largest delay.
        factor: growth per failure.
    """

    __slots__ = ("_next", "cap_s", "factor", "start_s")

    def __init__(
        self, start_s: float = BACKOFF_START_S, cap_s: float = BACKOFF_CAP_S, factor: float = 2.0
    ) -> None:
        self.start_s = start_s
        self.cap_s = cap_s
        self.factor = factor
        self._next = start_s

    def next_delay(self) -> float:
        """The delay to wait now; each call grows the following one up to the cap."""
        delay = self._next
        self._next = min(self.cap_s, self._next * self.factor)
        return delay * random.uniform(0.9, 1.1)  # jitter, not cryptography

    def reset(self) -> None:
        """Start again from the first delay (after a success)."""
        self._next = self.start_s


class Circuit:
    """Tracks whether one loop's broker calls are failing, and logs only the state changes.

    ``failure()`` returns how long to back off; ``success()`` closes the circuit. Safe to read
    from another thread (``state`` and the counters are plain attributes written by one owner).

    Args:
        name: the loop's name, used in log lines and in :meth:`Worker.health`.
        worker_id: named in log lines.
    """

    __slots__ = ("_backoff", "failures", "last_error", "name", "opened_at", "state", "worker_id")

    def __init__(self, name: str, worker_id: str = "", backoff: Backoff | None = None) -> None:
        self.name = name
        self.worker_id = worker_id
        self.state: str = CLOSED
        self.failures = 0
        self.opened_at: float | None = None
        self.last_error: str | None = None
        self._backoff = backoff or Backoff()

    @property
    def is_open(self) -> bool:
        """True while the broker calls of this loop are failing."""
        return self.state == OPEN

    def failure(self, exc: BaseException) -> float:
        """Record a failed broker call; return the delay before the next try."""
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.state == CLOSED:
            self.state = OPEN
            self.opened_at = time.monotonic()
            logger.warning(
                "worker %s: broker unavailable in %s, backing off and retrying: %s",
                self.worker_id,
                self.name,
                exc,
                extra={"action": "circuit_open", "loop": self.name},
            )
        return self._backoff.next_delay()

    def success(self) -> None:
        """Record a successful broker call; closes the circuit if it was open."""
        if self.state == OPEN:
            down_s = time.monotonic() - (self.opened_at or time.monotonic())
            logger.info(
                "worker %s: broker reachable again in %s after %.1f s (%d failed calls)",
                self.worker_id,
                self.name,
                down_s,
                self.failures,
                extra={"action": "circuit_closed", "loop": self.name},
            )
            self.state = CLOSED
            self.opened_at = None
            self.failures = 0
            self._backoff.reset()

    def snapshot(self) -> dict[str, object]:
        """State for health reports."""
        return {"state": self.state, "failures": self.failures, "last_error": self.last_error}
