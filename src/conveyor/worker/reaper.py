"""The reaper: recovers jobs of dead workers and promotes due scheduled jobs, on a fixed timer.

Every ``scan_interval_s`` it calls ``requeue_expired`` and ``promote_scheduled`` for each
consumed queue. Any live worker does this for everyone (not a random fraction of calls, not a user
cron), so a killed worker's jobs run again within ``lease_s + scan_interval_s`` of its death.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from conveyor.brokers.base import Broker
from conveyor.errors import BrokerReadOnly, BrokerUnavailable
from conveyor.metrics import Metrics
from conveyor.worker.circuit import Circuit

logger = logging.getLogger(__name__)


class Reaper:
    """Runs the recovery timer for ``queues``.

    Args:
        broker: the broker to scan.
        queues: the queues this worker consumes.
        scan_interval_s: the period.
        metrics: counts recovered jobs as ``lease_expirations``.
        ensure_connected: awaited before a scan (connects the app's broker after an outage).
        worker_id: for log lines.
    """

    def __init__(
        self,
        broker: Broker,
        queues: Sequence[str],
        *,
        scan_interval_s: float,
        metrics: Metrics,
        ensure_connected: Callable[[], Awaitable[None]],
        worker_id: str = "",
    ) -> None:
        self._broker = broker
        self._queues = list(queues)
        self.scan_interval_s = scan_interval_s
        self._metrics = metrics
        self._ensure_connected = ensure_connected
        self.worker_id = worker_id
        self.circuit = Circuit("reaper", worker_id)
        self._stop = asyncio.Event()
        self.last_scan_ms = 0

    def stop(self) -> None:
        """Stop after the current scan."""
        self._stop.set()

    async def run(self) -> None:
        """Scan at once, then every ``scan_interval_s`` until :meth:`stop`."""
        while not self._stop.is_set():
            delay = self.scan_interval_s
            try:
                await self._ensure_connected()
                await self.scan()
                self.circuit.success()
            except (BrokerUnavailable, BrokerReadOnly) as exc:
                delay = min(self.circuit.failure(exc), self.scan_interval_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def scan(self) -> None:
        """One pass over every queue: recover expired leases, promote due scheduled jobs."""
        broker = self._broker
        for queue in self._queues:
            report = await broker.requeue_expired(queue)
            recovered = len(report.requeued) + len(report.dead_lettered)
            if recovered:
                self._metrics.lease_expired(queue, recovered)
                logger.warning(
                    "worker %s: recovered %d job(s) of queue %s whose worker stopped renewing "
                    "their lease: %d requeued, %d dead-lettered",
                    self.worker_id,
                    recovered,
                    queue,
                    len(report.requeued),
                    len(report.dead_lettered),
                    extra={"action": "requeue_expired", "queue": queue},
                )
            await broker.promote_scheduled(queue)
        self.last_scan_ms = broker.clock.now_ms()


__all__ = ["Reaper"]
