"""Failpoints: make a process die (or fail) exactly at one broker step, for crash testing.

Test-only. Nothing in conveyor calls this module; a test program wraps its app's broker::

    from conveyor.testing import failpoints

    failpoints.install_from_env(app.broker)  # reads $CONVEYOR_FAILPOINT; no-op when unset

``CONVEYOR_FAILPOINT=STEP:ACTION[:N]`` names the step, what happens there, and which hit fires:

* ``STEP``: ``enqueue`` (:meth:`Broker.enqueue`), ``reserve`` (``reserve``, and
  ``ack_and_reserve`` when it reserves), ``ack`` (``ack``, ``ack_many``, and ``ack_and_reserve``
  when it acks), ``retry``, ``dead_letter`` (``dead-letter`` also accepted), ``release``,
  ``requeue`` (:meth:`Broker.requeue_expired`).
* ``ACTION``: ``before`` (SIGKILL this process before the broker call: the call never happens),
  ``after`` (SIGKILL it once the call returned: the broker did it, the caller never learns), or
  ``raise`` (raise :class:`FailpointError`, a RuntimeError, instead of making the call: an
  injected broker fault the process survives).
* ``N``: fire on the Nth hit of the step only (default 1), or ``N+``: on the Nth and every later
  hit. ``reserve:raise:1+`` makes every reserve fail; ``ack:after:3`` kills the process right
  after its third ack call.

A hit is one call from outside the broker: a broker method calling another wrapped one (the
default ``ack_and_reserve`` calls ``ack_many``) counts once. The process writes one line to
stderr (``failpoint ack:after fired on hit 1``) before it dies, so a driver can tell a failpoint
death from any other.

The wrapper replaces the bound methods on the broker *instance*: its type, settings and every
other method stay as they are (the worker's heartbeat, which compares broker types to open its
own connection, still does).
"""

from __future__ import annotations

import contextvars
import functools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from conveyor.brokers.base import Broker

#: The environment variable :func:`install_from_env` reads.
FAILPOINT_ENV: Final = "CONVEYOR_FAILPOINT"

#: Step name -> the broker methods that count as a hit of it.
STEPS: Final[Mapping[str, tuple[str, ...]]] = {
    "enqueue": ("enqueue",),
    "reserve": ("reserve", "ack_and_reserve"),
    "ack": ("ack", "ack_many", "ack_and_reserve"),
    "retry": ("retry",),
    "dead_letter": ("dead_letter",),
    "release": ("release",),
    "requeue": ("requeue_expired",),
}
ACTIONS: Final = ("before", "after", "raise")

# Set while a wrapped call runs, so the wrapped methods it calls itself are not hits.
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("conveyor_failpoint", default=False)


class FailpointError(RuntimeError):
    """Raised at a ``raise`` failpoint instead of the broker call."""


@dataclass
class Failpoint:
    """One armed failpoint: ``step``, ``action``, and the hits it fires on.

    Attributes:
        hits: how many times the step was reached so far.
        fired: how many times it fired (``raise`` only; a kill does not come back).
    """

    step: str
    action: str
    nth: int = 1
    onwards: bool = False
    hits: int = 0
    fired: int = 0
    _kill: Callable[[], None] = field(default=lambda: _sigkill_self(), repr=False)

    @classmethod
    def parse(cls, spec: str) -> Failpoint:
        """``STEP:ACTION[:N|:N+]`` (see the module docstring); ValueError names what is wrong."""
        parts = spec.strip().split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"failpoint {spec!r}: expected STEP:ACTION[:N]")
        step = parts[0].replace("-", "_")
        if step not in STEPS:
            raise ValueError(f"failpoint {spec!r}: unknown step; use one of {', '.join(STEPS)}")
        if parts[1] not in ACTIONS:
            raise ValueError(f"failpoint {spec!r}: unknown action; use one of {', '.join(ACTIONS)}")
        nth, onwards = 1, False
        if len(parts) == 3:
            text = parts[2]
            onwards = text.endswith("+")
            try:
                nth = int(text.removesuffix("+"))
            except ValueError:
                raise ValueError(f"failpoint {spec!r}: N must be an integer (or N+)") from None
            if nth < 1:
                raise ValueError(f"failpoint {spec!r}: N counts from 1")
        return cls(step, parts[1], nth, onwards)

    @property
    def spec(self) -> str:
        """The failpoint in its ``STEP:ACTION:N`` form."""
        return f"{self.step}:{self.action}:{self.nth}{'+' if self.onwards else ''}"

    def _hit(self) -> bool:
        """Count one hit; whether it fires."""
        self.hits += 1
        return self.hits == self.nth or (self.onwards and self.hits > self.nth)

    def _fire(self) -> None:
        self.fired += 1
        print(f"failpoint {self.step}:{self.action} fired on hit {self.hits}", file=sys.stderr)
        sys.stderr.flush()
        if self.action == "raise":
            raise FailpointError(f"failpoint {self.step}:raise (hit {self.hits})")
        self._kill()

    def wrap(self, broker: Broker) -> Broker:
        """Arm this failpoint on ``broker`` (its methods of the step); returns the same broker."""
        for name in STEPS[self.step]:
            original = getattr(broker, name)
            setattr(broker, name, self._wrapped(name, original))
        return broker

    def _wrapped(
        self, name: str, original: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(original)
        async def call(*args: Any, **kwargs: Any) -> Any:
            if _inside.get() or not _counts(self.step, name, args, kwargs):
                return await original(*args, **kwargs)
            fire = self._hit()
            if fire and self.action != "after":
                self._fire()  # kills, or raises: the call is not made
            token = _inside.set(True)
            try:
                result = await original(*args, **kwargs)
            finally:
                _inside.reset(token)
            if fire and self.action == "after":
                self._fire()
            return result

        return call


def _counts(step: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether this call is a hit of ``step``: ``ack_and_reserve`` only when it acks/reserves."""
    if name != "ack_and_reserve":
        return True
    if step == "ack":
        acks = args[0] if args else kwargs.get("acks", ())
        return bool(acks)
    n = args[2] if len(args) > 2 else kwargs.get("n", 0)
    return bool(n)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10.0)  # the signal is on its way; never return into the caller
    os._exit(137)


def install(broker: Broker, spec: str) -> Failpoint:
    """Arm the failpoint ``spec`` on ``broker``; returns it (its ``hits`` are readable)."""
    point = Failpoint.parse(spec)
    point.wrap(broker)
    return point


def install_from_env(broker: Broker, environ: Mapping[str, str] | None = None) -> Failpoint | None:
    """Arm ``$CONVEYOR_FAILPOINT`` on ``broker`` if it is set (else return None)."""
    spec = (os.environ if environ is None else environ).get(FAILPOINT_ENV, "").strip()
    return install(broker, spec) if spec else None


__all__ = [
    "ACTIONS",
    "FAILPOINT_ENV",
    "STEPS",
    "Failpoint",
    "FailpointError",
    "install",
    "install_from_env",
]
