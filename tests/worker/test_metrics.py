"""Worker metrics: counts add up, per queue and task, and render as Prometheus text."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from worker_helpers import eventually, finished, running

from conveyor import Conveyor, JobState, RetryPolicy
from conveyor.metrics import JOB_COUNTERS, Histogram, Metrics


def test_a_new_metrics_object_is_empty_and_private() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.series("q", "t").started += 1
    assert b.totals()["started"] == 0
    assert a.totals()["started"] == 1
    assert a.registry is not b.registry


def test_histograms_count_into_cumulative_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert h.as_dict() == {"count": 4, "sum": 3.65}


async def test_counts_add_up_over_a_mixed_workload(app_url: str) -> None:
    app = Conveyor(app_url)
    begun = asyncio.Event()

    @app.task(name="m.ok", queue="work")
    async def ok(x: int) -> int:
        return x

    @app.task(name="m.fail", queue="work", retry=RetryPolicy.fixed(0.01, max_attempts=2))
    async def fail() -> None:
        raise ValueError("nope")

    @app.task(name="m.hang", queue="work")
    async def hang() -> None:
        begun.set()
        await asyncio.sleep(60)

    async with app:
        ok_ids = [h.id for h in await app.enqueue_many([ok.request(i) for i in range(20)])]
        fail_ids = [h.id for h in await app.enqueue_many([fail.request() for _ in range(3)])]
        unknown = await app.enqueue("m.unknown", queue="work")
        hung = await hang.enqueue()
        async with running(app, heartbeat_s=0.1, scan_interval_s=0.05) as worker:
            await finished(app, [*ok_ids, *fail_ids, unknown.id])
            await begun.wait()
            await app.cancel(hung.id)
            await eventually(lambda: worker.metrics.totals()["cancelled"] == 1)
        metrics = worker.metrics.as_dict()

    t = metrics["totals"]
    assert t["started"] == 20 + 3 * 2 + 1 + 1
    assert t["completed"] == 20
    assert t["failed"] == 3 * 2 + 1
    assert t["retried"] == 3
    assert t["dead_lettered"] == 3 + 1
    assert t["cancelled"] == 1
    outcomes = ("completed", "retried", "dead_lettered", "cancelled", "released", "lease_lost")
    assert t["started"] == sum(t[k] for k in outcomes) + t["abandoned"]
    assert t["failed"] == t["retried"] + t["dead_lettered"]
    assert metrics["by_task"]["m.ok"]["completed"] == 20
    assert metrics["by_task"]["m.fail"]["dead_lettered"] == 3
    assert metrics["by_task"]["m.unknown"]["dead_lettered"] == 1
    assert metrics["by_queue"]["work"]["started"] == t["started"]
    assert metrics["time_in_queue_s"]["count"] == t["started"]
    assert metrics["run_time_s"]["count"] == 20 + 6 + 1
    assert metrics["running"] == 0
    assert metrics["executors"]["async"]["concurrency"] == 100
    assert metrics["executors"]["async"]["busy"] == 0


async def test_render_is_prometheus_text(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))

    @app.task(name="m.one")
    async def one() -> None: ...

    async with app:
        handles = await app.enqueue_many([one.request() for _ in range(5)])
        async with running(app) as worker:
            await finished(app, [h.id for h in handles])
            text = worker.metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in JOB_COUNTERS:
        assert f"conveyor_jobs_{name}" in families
    completed = {
        (s.labels["queue"], s.labels["task"]): s.value
        for s in families["conveyor_jobs_completed"].samples
        if s.name.endswith("_total")
    }
    assert completed == {("default", "m.one"): 5.0}
    assert "conveyor_executor_utilization" in families
    assert "conveyor_jobs_running" in families
    buckets = [
        s for s in families["conveyor_job_run_time_seconds"].samples if s.name.endswith("_count")
    ]
    assert buckets[0].value == 5.0


async def test_a_full_executor_counts_saturated_fetches(url_for: Any) -> None:
    app = Conveyor(url_for("memory"))
    release = asyncio.Event()

    @app.task(name="m.block")
    async def block() -> None:
        await release.wait()

    async with app:
        handles = await app.enqueue_many([block.request() for _ in range(4)])
        async with running(app, concurrency={"async": 2}) as worker:
            await eventually(lambda: worker.metrics.executors()["async"]["busy"] == 2)
            assert worker.metrics.executors()["async"]["utilization"] == 1.0
            assert worker.metrics.executors()["async"]["saturated"] == 1.0
            assert worker.metrics.executors()["async"]["saturated_fetches"] >= 1
            release.set()
            jobs = await finished(app, [h.id for h in handles])
    assert {j.state for j in jobs} == {JobState.COMPLETED}
