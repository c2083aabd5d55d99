"""What every load row shares: the result row, percentiles, process RSS, and loop-lag sampling."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    """One line of the load table: a scenario's figures against its goal.

    ``met`` is None when the row has no pass/fail (skipped, not measurable here).
    """

    id: str
    scenario: str
    broker: str
    figures: str
    goal: str
    met: bool | None


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of ``values`` (nearest rank; 0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb(pid: int) -> float | None:
    """The resident set (VmRSS) of process ``pid`` in MB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval_s`` on the running loop; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def peak(self) -> float:
        """The highest RSS seen (MB)."""
        return max(self.samples, default=0.0)

    async def _run(self) -> None:
        while True:
            value = rss_mb(self.pid)
            if value is None:
                return
            self.samples.append(value)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        """Begin sampling."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """End sampling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class LagMonitor:
    """Event-loop lag: how late a ``sleep(interval_s)`` wakes, sampled on the loop under test."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            late = time.perf_counter() - started - self.interval_s
            self.lags_ms.append(max(0.0, late) * 1000)

    def start(self) -> None:
        """Begin sampling."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """End sampling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
