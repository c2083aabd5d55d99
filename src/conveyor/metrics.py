"""Worker metrics: job counters per queue and task, executor gauges and timing histograms.

One :class:`Metrics` object per worker, with its own Prometheus ``CollectorRegistry`` (no
globals, so several workers in one process, or a test, never share counts). The hot path only
bumps plain ints on a cached :class:`JobSeries` (one per queue and task); the Prometheus metric
families are built from those ints when someone scrapes (:meth:`Metrics.render`), so recording a
job costs a few attribute increments and no locks.

Counts add up once a worker is idle: every started run ends in exactly one outcome::

    started == completed + retried + dead_lettered + cancelled + released + lease_lost + abandoned

``failed`` counts runs that ended in an exception, timed out, lost their process or could not
start at all; each is then ``retried`` or ``dead_lettered`` (or ``lease_lost`` if the job moved on
meanwhile), so ``failed >= retried + dead_lettered``. ``timeouts`` is the subset of ``failed``
that timed out. ``cancelled`` runs were stopped because their lease was revoked (the job was
cancelled or deleted); ``released`` ones were given back by a shutdown; ``lease_lost`` outcomes
were refused by the broker because the job had moved on; ``abandoned`` ones could not be written
before a shutdown deadline (the broker was unreachable) and are recovered by lease expiry.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

#: Counters kept per queue and task, in the order they are rendered.
JOB_COUNTERS: Final = (
    "enqueued",
    "started",
    "completed",
    "failed",
    "retried",
    "dead_lettered",
    "timeouts",
    "cancelled",
    "released",
    "lease_lost",
    "abandoned",
    "callback_failures",
)

_HELP: Final = {
    "enqueued": "Jobs enqueued (by clients that record it).",
    "started": "Jobs this worker took from the broker and began to run.",
    "completed": "Runs acknowledged as completed.",
    "failed": "Runs that raised, timed out, lost their process, or could not start.",
    "retried": "Failed runs scheduled to run again.",
    "dead_lettered": "Failed runs moved to dead letters.",
    "timeouts": "Runs stopped because they exceeded the job's timeout.",
    "cancelled": "Runs stopped because the job was cancelled, deleted or re-delivered.",
    "released": "Runs given back to the queue by a shutdown (no attempt charged).",
    "lease_lost": "Outcomes the broker refused because the job had moved on.",
    "abandoned": "Outcomes not stored (broker unreachable at shutdown); recovered by lease expiry.",
    "callback_failures": "on_success/on_failure callbacks that raised or timed out.",
}

#: Histogram bucket bounds in seconds (both histograms share them).
DEFAULT_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
)  # fmt: skip


class Histogram:
    """Counts of observations per bucket, their sum and count (cumulated only when rendered)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation (seconds)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus-style ``(le, cumulative count)`` pairs, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(bound), float(running)))
        return out

    def as_dict(self) -> dict[str, float]:
        """``{"count": n, "sum": s}``."""
        return {"count": self.count, "sum": self.sum}


class JobSeries:
    """The counters and histograms of one (queue, task) pair; cache it and bump its ints."""

    __slots__ = (*JOB_COUNTERS, "queue", "queue_time", "run_time", "task")

    def __init__(self, queue: str, task: str) -> None:
        self.queue = queue
        self.task = task
        self.enqueued = 0
        self.started = 0
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.timeouts = 0
        self.cancelled = 0
        self.released = 0
        self.lease_lost = 0
        self.abandoned = 0
        self.callback_failures = 0
        self.queue_time = Histogram()
        self.run_time = Histogram()

    def counters(self) -> dict[str, int]:
        """The counters as a dict."""
        return {name: getattr(self, name) for name in JOB_COUNTERS}


class _ExecutorStats:
    __slots__ = ("busy", "concurrency", "kind", "saturated_fetches")

    def __init__(self, kind: str, concurrency: int, busy: Callable[[], int]) -> None:
        self.kind = kind
        self.concurrency = concurrency
        self.busy = busy
        self.saturated_fetches = 0


class Metrics:
    """The metrics of one worker, renderable as Prometheus text or as a plain dict.

    Args:
        worker_id: reported in :meth:`as_dict`.
    """

    def __init__(self, worker_id: str = "") -> None:
        self.worker_id = worker_id
        self._series: dict[tuple[str, str], JobSeries] = {}
        self._lease_expirations: dict[str, int] = {}
        self._executors: dict[str, _ExecutorStats] = {}
        self._running: Callable[[], int] = lambda: 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    # -- recording (hot path: callers cache the series) -------------------------------------------

    def series(self, queue: str, task: str) -> JobSeries:
        """The (cached) series of ``queue`` and ``task``; bump its counters directly."""
        key = (queue, task)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = JobSeries(queue, task)
        return series

    def lease_expired(self, queue: str, n: int = 1) -> None:
        """Count jobs of ``queue`` that this worker's reaper recovered from dead workers."""
        self._lease_expirations[queue] = self._lease_expirations.get(queue, 0) + n

    def record_enqueued(self, queue: str, task: str, n: int = 1) -> None:
        """Count enqueued jobs (for clients that keep a Metrics object)."""
        self.series(queue, task).enqueued += n

    def bind_executor(self, kind: str, concurrency: int, busy: Callable[[], int]) -> None:
        """Report an executor's utilization; ``busy`` is read when metrics are rendered."""
        self._executors[kind] = _ExecutorStats(kind, concurrency, busy)

    def fetch_saturated(self, kind: str) -> None:
        """Count a fetch skipped because executor ``kind`` had no free slot."""
        stats = self._executors.get(kind)
        if stats is not None:
            stats.saturated_fetches += 1

    def bind_running(self, running: Callable[[], int]) -> None:
        """Report the worker's running-job count; ``running`` is read when rendered."""
        self._running = running

    # -- reading -----------------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        """Every counter summed over queues and tasks (plus ``lease_expirations``)."""
        out = dict.fromkeys(JOB_COUNTERS, 0)
        for series in list(self._series.values()):
            for name in JOB_COUNTERS:
                out[name] += getattr(series, name)
        out["lease_expirations"] = sum(self._lease_expirations.values())
        return out

    def executors(self) -> dict[str, dict[str, float]]:
        """Per executor: concurrency, busy, utilization (busy/concurrency), saturated fetches."""
        out: dict[str, dict[str, float]] = {}
        for kind, stats in list(self._executors.items()):
            busy = max(0, stats.busy())
            out[kind] = {
                "concurrency": stats.concurrency,
                "busy": busy,
                "utilization": busy / stats.concurrency if stats.concurrency else 0.0,
                "saturated": 1.0 if busy >= stats.concurrency else 0.0,
                "saturated_fetches": stats.saturated_fetches,
            }
        return out

    def as_dict(self) -> dict[str, Any]:
        """A plain nested dict of everything (for tests, health and seed 002's queue status)."""
        by_queue: dict[str, dict[str, int]] = {}
        by_task: dict[str, dict[str, int]] = {}
        queue_time = Histogram()
        run_time = Histogram()
        for series in list(self._series.values()):
            counters = series.counters()
            for table, key in ((by_queue, series.queue), (by_task, series.task)):
                row = table.setdefault(key, dict.fromkeys(JOB_COUNTERS, 0))
                for name, value in counters.items():
                    row[name] += value
            queue_time.sum += series.queue_time.sum
            queue_time.count += series.queue_time.count
            run_time.sum += series.run_time.sum
            run_time.count += series.run_time.count
        for queue, n in list(self._lease_expirations.items()):
            by_queue.setdefault(queue, dict.fromkeys(JOB_COUNTERS, 0))["lease_expirations"] = n
        return {
            "worker_id": self.worker_id,
            "totals": self.totals(),
            "by_queue": by_queue,
            "by_task": by_task,
            "executors": self.executors(),
            "running": self._running(),
            "time_in_queue_s": queue_time.as_dict(),
            "run_time_s": run_time.as_dict(),
        }

    def render(self) -> bytes:
        """Prometheus text exposition of this worker's metrics."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """The Prometheus metric families, built from the current counts."""
        series = list(self._series.values())
        labels = ["queue", "task"]
        for name in JOB_COUNTERS:
            family = CounterMetricFamily(f"conveyor_jobs_{name}", _HELP[name], labels=labels)
            for s in series:
                family.add_metric([s.queue, s.task], getattr(s, name))
            yield family
        expired = CounterMetricFamily(
            "conveyor_lease_expirations",
            "Jobs of dead workers requeued or dead-lettered by this worker's reaper.",
            labels=["queue"],
        )
        for queue, n in list(self._lease_expirations.items()):
            expired.add_metric([queue], n)
        yield expired
        yield from self._executor_families()
        running = GaugeMetricFamily("conveyor_jobs_running", "Jobs running in this worker now.")
        running.add_metric([], self._running())
        yield running
        for attr, metric, doc in (
            (
                "queue_time",
                "conveyor_job_queue_time_seconds",
                "Time from due (enqueue or run_at) to start.",
            ),
            ("run_time", "conveyor_job_run_time_seconds", "Time a run took in its executor."),
        ):
            hist = HistogramMetricFamily(metric, doc, labels=labels)
            for s in series:
                h: Histogram = getattr(s, attr)
                hist.add_metric([s.queue, s.task], h.cumulative(), h.sum)
            yield hist

    def _executor_families(self) -> Iterator[Metric]:
        stats = self.executors()
        families = {
            "utilization": GaugeMetricFamily(
                "conveyor_executor_utilization",
                "Busy slots / concurrency per executor.",
                labels=["executor"],
            ),
            "busy": GaugeMetricFamily(
                "conveyor_executor_busy", "Busy slots per executor.", labels=["executor"]
            ),
            "concurrency": GaugeMetricFamily(
                "conveyor_executor_concurrency", "Slots per executor.", labels=["executor"]
            ),
            "saturated": GaugeMetricFamily(
                "conveyor_executor_saturated",
                "1 while the executor has no free slot (the fetcher does not fetch for it).",
                labels=["executor"],
            ),
        }
        skipped = CounterMetricFamily(
            "conveyor_executor_saturated_fetches",
            "Fetches skipped because the executor had no free slot.",
            labels=["executor"],
        )
        for kind, row in stats.items():
            for key, family in families.items():
                family.add_metric([kind], row[key])
            skipped.add_metric([kind], row["saturated_fetches"])
        yield from families.values()
        yield skipped


class _Collector:
    """Adapts :meth:`Metrics.collect` to the prometheus_client collector protocol."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


__all__ = ["DEFAULT_BUCKETS_S", "JOB_COUNTERS", "Histogram", "JobSeries", "Metrics"]
