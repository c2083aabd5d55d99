"""The operator's view of the service: ``/health``, ``/metrics``, request counting, loop lag.

``/health`` never waits long and never needs a worker's cooperation: it pings the broker with a
bounded timeout, reads each in-process worker's ``health()`` (a plain dict built without
awaiting), the event hub's state and the loop-lag monitor's last reading. It answers 503 when the
broker is unreachable or a worker stopped consuming (what a supervisor should act on), 200 with
``degraded`` for problems that do not stop the service.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor import __version__
from conveyor.errors import ConveyorError
from conveyor.job import JobState
from conveyor.metrics import Histogram
from conveyor.service import schemas as s

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from conveyor.service.operations import Service

LAG_INTERVAL_S: Final = 0.25
LAG_WINDOW_S: Final = 10.0
#: Loop lag above this makes the service ``degraded``: something is blocking the event loop.
LAG_DEGRADED_S: Final = 0.5
_METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_BAD_WORKER_STATUS: Final = frozenset({"unhealthy", "stopped", "dead", "failed", "down"})


# -- health ----------------------------------------------------------------------------------------


async def build_health(service: Service, *, include_counts: bool = False) -> s.HealthOut:
    """The health report (see the module docstring for how the status is decided)."""
    problems: list[str] = []
    broker = await _ping(service)
    fatal = not broker.reachable
    if fatal:
        problems.append(f"broker unreachable: {broker.error}")
    workers = [_worker_report(i, w) for i, w in enumerate(service.workers)]
    for report in workers:
        if not report["healthy"]:
            fatal = True
            problems.append(f"worker {report['index']} is not consuming: {report.get('error')}")
    hub = service.hub
    events = s.EventsHealth(
        running=hub.running,
        clients=hub.clients,
        direct_clients=hub.direct_clients,
        dropped_clients=hub.dropped_clients,
        last_event_id=hub.last_id,
        error=hub.error,
    )
    if not hub.running and broker.reachable:
        problems.append(f"event stream not running: {hub.error or 'starting'}")
    if service.loop_lag_s > LAG_DEGRADED_S:
        problems.append(f"event loop lag {service.loop_lag_s * 1000:.0f} ms: something blocks it")
    counts: dict[JobState, int] | None = None
    if include_counts and broker.reachable:
        counts = await _totals(service)
    status: Literal["ok", "degraded", "unavailable"] = "ok"
    if fatal:
        status = "unavailable"
    elif problems:
        status = "degraded"
    return s.HealthOut(
        status=status,
        problems=problems,
        version=__version__,
        uptime_s=round(time.monotonic() - service.started_at, 3),
        loop_lag_ms=round(service.loop_lag_s * 1000, 3),
        broker=broker,
        events=events,
        workers=workers,
        counts=counts,
    )


async def _ping(service: Service) -> s.BrokerHealth:
    broker = service.app.broker
    kind = type(broker).__name__
    circuit: Literal["open", "closed"] = "open" if service.guard.is_open else "closed"
    started = time.perf_counter()
    try:
        async with asyncio.timeout(service.settings.health_timeout_s):
            await service.app.connect()
            await broker.ping()
    except TimeoutError:
        error = f"no answer within {service.settings.health_timeout_s:g} s"
        return s.BrokerHealth(reachable=False, kind=kind, error=error, circuit=circuit)
    except ConveyorError as exc:
        return s.BrokerHealth(reachable=False, kind=kind, error=exc.message, circuit=circuit)
    service.guard.success()  # a probe that gets through closes the breaker early
    latency = round((time.perf_counter() - started) * 1000, 3)
    return s.BrokerHealth(reachable=True, kind=kind, latency_ms=latency, circuit="closed")


async def _totals(service: Service) -> dict[JobState, int] | None:
    try:
        async with asyncio.timeout(service.settings.health_timeout_s):
            per_queue = await service.app.counts()
    except (TimeoutError, ConveyorError):
        return None
    totals = dict.fromkeys(JobState, 0)
    for row in per_queue.values():
        for state, n in row.items():
            totals[state] += n
    return totals


def _worker_report(index: int, worker: Any) -> dict[str, Any]:
    """A worker's own health dict, plus ``index`` and a ``healthy`` verdict."""
    try:
        report = dict(worker.health())
    except Exception as exc:  # a health probe must report a broken worker, not crash on it
        return {"index": index, "healthy": False, "error": f"{type(exc).__name__}: {exc}"}
    healthy = bool(report.get("healthy", report.get("alive", True)))
    if str(report.get("status", "")).lower() in _BAD_WORKER_STATUS:
        healthy = False
    report.update(index=index, healthy=healthy)
    return report


async def monitor_loop_lag(service: Service) -> None:
    """Measure how late the loop wakes a sleeper: a blocked loop shows up in /health and metrics.

    ``service.loop_lag_s`` is the worst lag of the last ``LAG_WINDOW_S``, so a stall that is
    over by the time someone looks is still reported.
    """
    loop = asyncio.get_running_loop()
    samples: deque[float] = deque(maxlen=int(LAG_WINDOW_S / LAG_INTERVAL_S))
    while True:
        expected = loop.time() + LAG_INTERVAL_S
        await asyncio.sleep(LAG_INTERVAL_S)
        samples.append(max(0.0, loop.time() - expected))
        service.loop_lag_s = max(samples)


# -- request metrics -------------------------------------------------------------------------------


class HttpStats:
    """Requests per method, route template and status, and their durations per route."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.durations: dict[str, Histogram] = {}

    def record(self, method: str, route: str, status: int, duration_s: float) -> None:
        """Count one finished request."""
        method = method if method in _METHODS else "OTHER"
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.durations.get(route)
        if hist is None:
            hist = self.durations[route] = Histogram()
        hist.observe(duration_s)


class RequestMetrics:
    """ASGI middleware counting HTTP requests per route template and status.

    The template (``/jobs/{job_id}``), never the raw path: job ids would make the label set
    unbounded.
    """

    def __init__(self, app: ASGIApp, stats: HttpStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; count it once it is answered."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.stats.record(scope["method"], route, status, time.perf_counter() - started)


# -- metrics ---------------------------------------------------------------------------------------


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def render_metrics(service: Service) -> bytes:
    """Prometheus text: the service's own metrics, queue depths and every worker's metrics."""
    families: list[Metric] = list(_service_families(service))
    up = GaugeMetricFamily("conveyor_broker_up", "1 if the broker answered this scrape.")
    try:
        async with asyncio.timeout(service.settings.health_timeout_s):
            per_queue = await service.app.counts()
    except (TimeoutError, ConveyorError):
        up.add_metric([], 0)
    else:
        up.add_metric([], 1)
        depth = GaugeMetricFamily(
            "conveyor_queue_jobs", "Jobs per queue and state.", labels=["queue", "state"]
        )
        for queue, row in sorted(per_queue.items()):
            for state, n in row.items():
                depth.add_metric([queue, state.value], n)
        families.append(depth)
    families.append(up)
    families.extend(_worker_families(service))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)


def _service_families(service: Service) -> Iterator[Metric]:
    stats: HttpStats = service.http
    requests = CounterMetricFamily(
        "conveyor_http_requests",
        "HTTP requests by method, route and status.",
        labels=["method", "route", "status"],
    )
    for (method, route, status), n in sorted(stats.requests.items()):
        requests.add_metric([method, route, str(status)], n)
    yield requests
    durations = HistogramMetricFamily(
        "conveyor_http_request_duration_seconds", "HTTP request durations.", labels=["route"]
    )
    for route, hist in sorted(stats.durations.items()):
        durations.add_metric([route], hist.cumulative(), hist.sum)
    yield durations
    hub = service.hub
    for name, doc, value in (
        ("conveyor_events_clients", "Connected event-stream clients.", hub.clients),
        (
            "conveyor_events_direct_clients",
            "Clients replaying from the broker.",
            hub.direct_clients,
        ),
        ("conveyor_events_subscribed", "1 while the shared subscription runs.", int(hub.running)),
        ("conveyor_service_loop_lag_seconds", "Event loop lag.", service.loop_lag_s),
        (
            "conveyor_service_broker_circuit_open",
            "1 while answering 503.",
            int(service.guard.is_open),
        ),
    ):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], value)
        yield gauge
    for name, doc, total in (
        (
            "conveyor_events_dropped_clients",
            "Stream clients dropped as too slow.",
            hub.dropped_clients,
        ),
        ("conveyor_events_published", "Events fanned out by the shared subscription.", hub.head),
    ):
        counter = CounterMetricFamily(name, doc)
        counter.add_metric([], total)
        yield counter


def _worker_families(service: Service) -> Iterator[Metric]:
    """Every worker's families; with several workers, merged by name with a ``worker`` label."""
    found = (getattr(worker, "metrics", None) for worker in service.workers)
    sources: list[Any] = [metrics for metrics in found if hasattr(metrics, "collect")]
    if len(sources) == 1:
        yield from sources[0].collect()
        return
    merged: dict[str, Metric] = {}
    for index, metrics in enumerate(sources):
        for family in metrics.collect():
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = type(family)(
                    family.name, family.documentation, labels=[]
                )
                target.samples = []
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(index)}
                target.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp))
    yield from merged.values()
