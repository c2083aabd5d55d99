"""Live events over SSE and WebSocket: order, filters, resume from a cursor, slow clients."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from .asgi import SSEStream, WSSession
from .conftest import Served, serving

Next = Callable[[float], Awaitable[dict[str, Any] | None]]

#: (kind, state or payload) of the lifecycle driven by :func:`drive`, in order.
LIFECYCLE = [
    ("state", "pending"),
    ("state", "queued"),
    ("state", "stopped"),
    ("state", "queued"),
    ("state", "running"),
    ("progress", 40),
    ("log", "line one"),
    ("state", "completed"),
    ("deleted", None),
]


#: Probe jobs are held (pending), so a test's reserve never takes one.
PROBE = {"task": "probe.ping", "start": False}


def summary(event: dict[str, Any]) -> tuple[str, Any]:
    kind = event["kind"]
    detail = {
        "state": event.get("state"),
        "progress": event.get("progress"),
        "log": event.get("line"),
    }
    return kind, detail.get(kind)


async def drive(served: Served, queue: str) -> str:
    """One job through every kind of event, half through the API, half as a worker would."""
    client = served.client
    job_id = (
        await client.post("/jobs", json={"task": "t.e", "queue": queue, "start": False})
    ).json()["job_id"]
    assert (await client.post(f"/jobs/{job_id}/start")).status_code == 200
    assert (await client.post(f"/jobs/{job_id}/stop")).status_code == 200
    assert (await client.post(f"/jobs/{job_id}/retry")).status_code == 200
    [job] = await served.broker.reserve(queue, 1, lease_s=30)
    await served.broker.set_progress(job.lease, 40)
    await served.broker.append_log(job.lease, ["line one"])
    await served.broker.ack(job.lease, "done")
    assert (await client.delete(f"/jobs/{job_id}")).status_code == 200
    return job_id


async def go_live(client: httpx.AsyncClient, next_event: Next, queue: str) -> None:
    """Enqueue probe jobs until one's event arrives: the shared subscription is then following.

    A fresh client sees events published after it attached, and right after startup the hub's
    own broker subscription may still be getting its first position (Redis asks the server).
    """
    for _ in range(50):
        probe = (await client.post("/jobs", json=PROBE | {"queue": queue})).json()["job_id"]
        try:
            while True:
                event = await next_event(0.2)
                assert event is not None, "stream ended while going live"
                if event.get("job_id") == probe:
                    return
        except TimeoutError:
            continue
    raise AssertionError("the event stream never delivered a probe")


async def collect(next_event: Next, job_id: str, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count:
        event = await next_event(5.0)
        assert event is not None, f"stream ended after {out}"
        if event.get("job_id") == job_id:
            out.append(event)
    return out


def sse_next(stream: SSEStream) -> Next:
    async def next_event(timeout_s: float) -> dict[str, Any] | None:
        event = await stream.next(timeout_s)
        return None if event is None else {**event.data, "_id": event.id, "_event": event.event}

    return next_event


def ws_next(session: WSSession) -> Next:
    async def next_event(timeout_s: float) -> dict[str, Any] | None:
        while True:
            message = await session.next(timeout_s)
            if message is None or message.get("kind") != "heartbeat":
                return message

    return next_event


@pytest.mark.usefixtures("broker_kind")
async def test_sse_delivers_a_jobs_state_changes_in_order(served: Served) -> None:
    async with SSEStream(served.api, query={"queue": "ev"}) as stream:
        assert stream.status == 200
        await go_live(served.client, sse_next(stream), "ev")
        job_id = await drive(served, "ev")
        events = await collect(sse_next(stream), job_id, len(LIFECYCLE))
    assert [summary(e) for e in events] == LIFECYCLE
    assert all(e["_id"] == e["id"] and e["_event"] == e["kind"] for e in events)


@pytest.mark.usefixtures("broker_kind")
async def test_websocket_delivers_a_jobs_state_changes_in_order(served: Served) -> None:
    async with WSSession(served.api, query={"queue": "ws"}) as session:
        assert session.accepted
        await go_live(served.client, ws_next(session), "ws")
        job_id = await drive(served, "ws")
        events = await collect(ws_next(session), job_id, len(LIFECYCLE))
    assert [summary(e) for e in events] == LIFECYCLE


@pytest.mark.usefixtures("broker_kind")
async def test_streams_resume_after_a_cursor_without_gaps(served: Served) -> None:
    async with SSEStream(served.api, query={"queue": "rs"}) as stream:
        await go_live(served.client, sse_next(stream), "rs")
        job_id = await drive(served, "rs")
        seen = await collect(sse_next(stream), job_id, len(LIFECYCLE))
    cursor = seen[3]["id"]
    async with SSEStream(
        served.api, query={"job_id": job_id}, headers={"last-event-id": cursor}
    ) as again:
        replayed = await collect(sse_next(again), job_id, len(LIFECYCLE) - 4)
    assert [e["id"] for e in replayed] == [e["id"] for e in seen[4:]]
    async with WSSession(served.api, query={"job_id": job_id, "after": cursor}) as session:
        over_ws = await collect(ws_next(session), job_id, len(LIFECYCLE) - 4)
    assert [e["id"] for e in over_ws] == [e["id"] for e in seen[4:]]


@pytest.mark.usefixtures("broker_kind")
async def test_a_cursor_older_than_the_ring_replays_from_the_broker_then_joins_it(
    broker_kind: str, build: Any
) -> None:
    api, app = build(broker_kind, event_history=16, event_max_lag=8)
    async with serving(api) as client:
        served = Served(api, client, app)
        async with SSEStream(api, query={"queue": "old"}) as stream:
            await go_live(client, sse_next(stream), "old")
            first = await drive(served, "old")
            seen = await collect(sse_next(stream), first, len(LIFECYCLE))
        for _ in range(3):
            await drive(served, "old")  # pushes the first job's events out of the ring
        hub = served.service.hub
        for _ in range(100):  # the hub follows the broker asynchronously
            if hub.seq_of(seen[0]["id"]) is None:
                break
            await asyncio.sleep(0.02)
        assert hub.seq_of(seen[0]["id"]) is None
        async with SSEStream(api, query={"queue": "old", "after": seen[0]["id"]}) as resumed:
            replayed = await collect(sse_next(resumed), first, len(LIFECYCLE) - 1)
            assert [e["id"] for e in replayed] == [e["id"] for e in seen[1:]]
            latest = await drive(served, "old")
            live = await collect(sse_next(resumed), latest, len(LIFECYCLE))
            assert [summary(e) for e in live] == LIFECYCLE
            assert hub.direct_clients == 0  # caught up: served from the shared ring again


async def test_bad_filters_and_cursors_are_refused_before_streaming(memory_served: Served) -> None:
    for query in ({"queue": "bad queue!"}, {"after": "not-a-cursor"}, {"job_id": "x" * 200}):
        async with SSEStream(memory_served.api, query=query) as stream:
            assert stream.status == 422, query
            assert b'"error"' in stream.body
        async with WSSession(memory_served.api, query=query) as session:
            assert session.close_code == 1008 or session.denied_status == 422, query


async def test_a_slow_client_is_dropped_and_a_fast_one_is_not(build: Any) -> None:
    # A burst puts every client far behind at once; the rule is about staying behind. The grace
    # is long enough for a reader that keeps up to drain a burst on a loaded 2-core machine
    # (0.2 s was not, in asyncio debug mode), and far shorter than the slow reader needs.
    api, _ = build("memory", event_max_lag=50, event_lag_grace_s=1.0)
    async with serving(api) as client:
        async with SSEStream(api) as fast, SSEStream(api, send_delay_s=0.3) as slow:
            await go_live(client, sse_next(fast), "default")
            batch = [{"task": "t.flood", "queue": "flood"}] * 1000
            for _ in range(2):
                assert (await client.post("/jobs", json=batch)).status_code == 201
            flood = 0
            while flood < 2000:
                try:
                    event = await fast.next(5.0)
                except TimeoutError:
                    raise AssertionError(f"stuck after {flood} flood events") from None
                assert event is not None
                assert event.event != "dropped"
                flood += event.data.get("task") == "t.flood"
            last = None
            while (event := await slow.next(10.0)) is not None:
                last = event
            assert last is not None
            assert last.event == "dropped"
            assert "slow consumer" in last.data["reason"]
        assert api.state.service.hub.dropped_clients == 1


async def test_a_slow_websocket_is_closed_with_1008(build: Any) -> None:
    api, _ = build("memory", event_max_lag=50, event_lag_grace_s=0.2, event_send_timeout_s=0.2)
    async with serving(api) as client:
        async with WSSession(api, send_delay_s=1.0) as session:  # a peer that stopped reading
            await client.post("/jobs", json=[{"task": "t.flood"}] * 200)
            for _ in range(100):
                if session.close_code is not None:
                    break
                await asyncio.sleep(0.05)
        assert session.close_code == 1008
        assert "slow consumer" in session.close_reason


async def test_client_limit_answers_503_and_1013(build: Any) -> None:
    api, _ = build("memory", max_event_clients=1)
    async with serving(api):
        async with SSEStream(api) as first:
            assert first.status == 200
            async with SSEStream(api) as second:
                assert second.status == 503
            async with WSSession(api) as session:
                assert session.close_code == 1013
        async with SSEStream(api) as third:
            assert third.status == 200


async def test_shutdown_ends_open_streams(build: Any) -> None:
    api, _ = build("memory")
    lifespan = api.router.lifespan_context(api)
    await lifespan.__aenter__()
    try:
        stream = SSEStream(api)
        session = WSSession(api)
        await stream.__aenter__()
        await session.__aenter__()
    finally:
        await lifespan.__aexit__(None, None, None)
    final = None
    while (event := await stream.next(5.0)) is not None:
        final = event
    assert final is not None
    assert final.event == "end"
    assert await session.next(5.0) is None
    assert session.close_code == 1001
    await stream.__aexit__(None, None, None)
    await session.__aexit__(None, None, None)
