"""SIGINT/SIGTERM handling for a worker: the first signal stops gracefully, the second at once.

Handlers go through ``loop.add_signal_handler``, so they run on the event loop (never inside
arbitrary code the way ``signal.signal`` handlers do). After the second signal the default
handlers are restored, so a third one terminates the process the ordinary way even if something
is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from conveyor.worker.worker import Worker

logger = logging.getLogger(__name__)

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def install(worker: Worker) -> Callable[[], None]:
    """Stop ``worker`` on SIGINT/SIGTERM; returns a callable that restores the defaults.

    First signal: ``worker.stop()`` (finish running jobs within the grace period, then release
    the rest). Second signal: ``worker.stop(grace_period_s=0)`` (cancel and release now), and the
    default handlers come back. Must be called on the loop the worker runs on, in the main thread.
    """
    loop = asyncio.get_running_loop()
    received = 0
    installed: list[signal.Signals] = []

    def uninstall() -> None:
        while installed:
            sig = installed.pop()
            with contextlib.suppress(Exception):  # loop closed, or not the main thread any more
                loop.remove_signal_handler(sig)

    def handle(sig: signal.Signals) -> None:
        nonlocal received
        received += 1
        if received == 1:
            logger.info(
                "worker %s: %s received, stopping gracefully (up to %.1f s for running jobs); "
                "send it again to stop at once",
                worker.worker_id,
                sig.name,
                worker.grace_period_s,
                extra={"action": "signal"},
            )
            worker.stop()
            return
        logger.warning(
            "worker %s: %s received again, stopping now: running jobs are cancelled and released",
            worker.worker_id,
            sig.name,
            extra={"action": "signal"},
        )
        worker.stop(grace_period_s=0)
        uninstall()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, handle, sig)
        installed.append(sig)
    return uninstall


__all__ = ["SIGNALS", "install"]
