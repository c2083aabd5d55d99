"""The REST API end to end on every broker: enqueue, inspect, control, queues, dead letters."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from conveyor.job import FailureReason, JobState

from .conftest import Served

pytestmark = pytest.mark.usefixtures("broker_kind")


async def _add(served: Served, **fields: object) -> str:
    response = await served.client.post("/jobs", json={"task": "t.work", **fields})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def test_enqueue_one_job_and_read_it_back(served: Served) -> None:
    job_id = await _add(served, args=[1, "two"], kwargs={"x": [3]}, queue="q1", priority="high")
    response = await served.client.get(f"/jobs/{job_id}")
    assert response.status_code == 200
    job = response.json()
    assert job["id"] == job_id
    assert job["state"] == "queued"
    assert (job["args"], job["kwargs"], job["queue"], job["priority"]) == (
        [1, "two"],
        {"x": [3]},
        "q1",
        "high",
    )
    assert "lease_token" not in job


async def test_enqueue_a_batch_returns_ids_in_order(served: Served) -> None:
    specs = [{"task": "t.work", "args": [i], "job_id": f"batch-{i}"} for i in range(5)]
    response = await served.client.post("/jobs", json=specs)
    assert response.status_code == 201
    assert response.json() == {"job_ids": [f"batch-{i}" for i in range(5)]}


async def test_a_bad_job_in_a_batch_writes_nothing(served: Served) -> None:
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    specs = [{"task": "t.work"}, {"task": "t.work", "args": deep}]
    response = await served.client.post("/jobs", json=specs)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unencodable_payload_error"
    assert (await served.client.get("/jobs")).json()["jobs"] == []


async def test_non_json_numbers_are_a_400_not_a_crash(served: Served) -> None:
    for body in (b'{"task": "t.work", "args": [NaN]}', b'{"task": "t.work", "args": [1e400]}'):
        response = await served.client.post(
            "/jobs", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == "bad_request"


async def test_dedup_key_returns_the_live_job(served: Served) -> None:
    first = await _add(served, dedup_key="k1")
    again = await _add(served, dedup_key="k1")
    assert first == again


async def test_pending_job_starts_on_request(served: Served) -> None:
    job_id = await _add(served, start=False)
    assert (await served.client.get(f"/jobs/{job_id}")).json()["state"] == "pending"
    response = await served.client.post(f"/jobs/{job_id}/start")
    assert response.status_code == 200
    assert response.json()["state"] == "queued"
    again = await served.client.post(f"/jobs/{job_id}/start")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "invalid_transition"


async def test_delay_schedules_the_job(served: Served) -> None:
    job_id = await _add(served, delay_s=60)
    assert (await served.client.get(f"/jobs/{job_id}")).json()["state"] == "scheduled"


async def test_stop_retry_and_delete(served: Served) -> None:
    job_id = await _add(served)
    stopped = await served.client.post(f"/jobs/{job_id}/stop")
    assert stopped.json()["state"] == "stopped"
    assert (await served.client.post(f"/jobs/{job_id}/stop")).status_code == 409
    retried = await served.client.post(f"/jobs/{job_id}/retry")
    assert retried.status_code == 200
    assert retried.json()["state"] == "queued"
    assert (await served.client.post(f"/jobs/{job_id}/retry")).status_code == 409
    deleted = await served.client.delete(f"/jobs/{job_id}")
    assert deleted.json() == {"job_id": job_id, "deleted": True}
    for method, path in (
        ("GET", f"/jobs/{job_id}"),
        ("DELETE", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/logs"),
        ("POST", f"/jobs/{job_id}/start"),
        ("POST", f"/jobs/{job_id}/retry"),
    ):
        response = await served.client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "job_not_found"


async def test_logs_and_progress_written_by_a_worker_are_served(served: Served) -> None:
    job_id = await _add(served, queue="logs")
    [job] = await served.broker.reserve("logs", 1, lease_s=30)
    await served.broker.set_progress(job.lease, 40, "halfway")
    await served.broker.append_log(job.lease, ["one", "two", "three"])
    current = (await served.client.get(f"/jobs/{job_id}")).json()
    assert (current["state"], current["progress"], current["description"]) == (
        "running",
        40,
        "halfway",
    )
    logs = (
        await served.client.get(f"/jobs/{job_id}/logs", params={"offset": 1, "limit": 1})
    ).json()
    assert logs == {"job_id": job_id, "lines": ["two"], "offset": 1, "total": 3, "dropped": 0}


async def test_list_filters_and_paginates(served: Served) -> None:
    ids = [await _add(served, queue="a", args=[i]) for i in range(5)]
    await _add(served, queue="b")
    await _add(served, queue="a", task="t.other")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, object] = {"queue": "a", "task": "t.work", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await served.client.get("/jobs", params=params)).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    states = (await served.client.get("/jobs", params={"state": ["pending", "stopped"]})).json()
    assert states["jobs"] == []


async def test_invalid_filters_are_422_with_field_paths(served: Served) -> None:
    response = await served.client.get("/jobs", params={"state": "nope", "limit": 0, "stat": 1})
    assert response.status_code == 422
    locs = {tuple(f["loc"]) for f in response.json()["error"]["fields"]}
    assert {("query", "state", 0), ("query", "limit"), ("query", "stat")} <= locs
    bad_cursor = await served.client.get("/jobs", params={"cursor": "not-a-cursor"})
    assert bad_cursor.status_code == 422


async def test_queues_counts_and_purge(served: Served) -> None:
    await _add(served, queue="c1")
    await _add(served, queue="c1", start=False)
    job_id = await _add(served, queue="c2")
    await served.client.post(f"/jobs/{job_id}/stop")
    counts = (await served.client.get("/queues")).json()
    assert counts["queues"]["c1"]["queued"] == 1
    assert counts["queues"]["c1"]["pending"] == 1
    assert counts["queues"]["c2"]["stopped"] == 1
    assert counts["totals"]["queued"] == 1
    one = (await served.client.get("/queues", params={"queue": "c2"})).json()
    assert set(one["queues"]) == {"c2"}
    purged = await served.client.delete("/queues/c1")
    assert purged.json() == {"queue": "c1", "deleted": 2}
    refused = await served.client.delete("/queues/c2", params={"state": "running"})
    assert refused.status_code == 422
    assert (await served.client.delete("/queues/bad name!")).status_code == 422


async def test_dead_letters_list_and_redrive(served: Served) -> None:
    job_id = await _add(served, queue="dl", max_attempts=1)
    [job] = await served.broker.reserve("dl", 1, lease_s=30)
    await served.broker.dead_letter(job.lease, reason=FailureReason.EXHAUSTED, error="boom")
    page = (await served.client.get("/dead-letters", params={"queue": "dl"})).json()
    assert [j["id"] for j in page["jobs"]] == [job_id]
    assert page["jobs"][0]["error"] == "boom"
    assert page["jobs"][0]["failure_reason"] == "exhausted"
    redriven = await served.client.post("/dead-letters/redrive", json={"job_ids": [job_id]})
    assert redriven.json() == {"redriven": 1, "queues": ["dl"]}
    again = (await served.client.get(f"/jobs/{job_id}")).json()
    assert again["state"] == JobState.QUEUED
    assert (await served.client.post("/dead-letters/redrive")).json()["redriven"] == 0


async def test_health_reports_broker_and_events(served: Served) -> None:
    response = await served.client.get("/health", params={"counts": "true"})
    assert response.status_code == 200
    report = response.json()
    assert report["broker"]["reachable"] is True
    assert report["broker"]["circuit"] == "closed"
    assert report["status"] in ("ok", "degraded")
    assert report["counts"] is not None


async def test_metrics_are_prometheus_text(served: Served) -> None:
    await _add(served, queue="m")
    response = await served.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'conveyor_queue_jobs{queue="m",state="queued"} 1.0' in text
    assert 'conveyor_http_requests_total{method="POST",route="/jobs",status="201"} 1.0' in text
    assert "conveyor_broker_up 1.0" in text


async def test_concurrent_enqueues_share_broker_calls_and_keep_errors_apart(
    served: Served,
) -> None:
    calls: list[int] = []
    enqueue = served.broker.enqueue

    async def counting(jobs: Any) -> list[str]:
        calls.append(len(jobs))
        return await enqueue(jobs)

    served.broker.enqueue = counting  # type: ignore[method-assign]
    taken = await _add(served, job_id="taken")

    async def post(i: int) -> httpx.Response:
        spec = {"task": "t.work", "job_id": "taken" if i == 7 else f"c-{i}"}
        return await served.client.post("/jobs", json=spec)

    responses = await asyncio.gather(*(post(i) for i in range(40)))
    assert [r.status_code for r in responses].count(201) == 39
    assert responses[7].status_code == 422  # only the request that reused an id fails
    assert "already in use" in responses[7].json()["error"]["message"]
    assert taken == "taken"
    assert sum(1 for n in calls if n > 1) >= 1  # some requests went out together
    page = (await served.client.get("/jobs", params={"limit": 100})).json()
    assert len(page["jobs"]) == 40
