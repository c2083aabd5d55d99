"""JSON-RPC 2.0 at /rpc: seed 004's methods, batches, notifications, and every error code."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conveyor.errors import ErrorCode

from .conftest import Served

JSON = {"content-type": "application/json"}


def call(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    if id_ is not None:
        message["id"] = id_
    return message


async def rpc(client: httpx.AsyncClient, payload: Any) -> httpx.Response:
    response = await client.post("/rpc", json=payload)
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    return response


async def test_seed_004_flow_add_start_status_logs_stop_delete(served: Served) -> None:
    client = served.client
    added = (await rpc(client, call("queue_add_job", {"task": "t.work", "args": [1]}))).json()
    job_id = added["result"]["job_id"]
    status = (await rpc(client, call("queue_get_job_status", {"job_id": job_id}))).json()
    assert status["result"]["state"] == "pending"  # seed 004: add holds the job until started
    started = (await rpc(client, call("queue_start_job", [job_id]))).json()
    assert started["result"]["state"] == "queued"
    logs = (await rpc(client, call("queue_get_job_logs", {"job_id": job_id}))).json()
    assert logs["result"]["lines"] == []
    listed = (await rpc(client, call("queue_list_jobs", {"state": ["queued"]}))).json()
    assert [j["id"] for j in listed["result"]["jobs"]] == [job_id]
    stopped = (await rpc(client, call("queue_stop_job", {"job_id": job_id}))).json()
    assert stopped["result"]["state"] == "stopped"
    retried = (await rpc(client, call("queue_retry_job", {"job_id": job_id}))).json()
    assert retried["result"]["state"] == "queued"
    counts = (await rpc(client, call("queue_counts"))).json()
    assert counts["result"]["totals"]["queued"] == 1
    deleted = (await rpc(client, call("queue_delete_job", {"job_id": job_id}))).json()
    assert deleted["result"] == {"job_id": job_id, "deleted": True}
    health = (await rpc(client, call("queue_health"))).json()
    assert health["result"]["broker"]["reachable"] is True
    for method, params in (
        ("queue_purge", {"queue": "default"}),
        ("queue_list_dead_letters", {}),
        ("queue_redrive", {"queue": "default"}),
        ("queue_add_jobs", {"jobs": [{"task": "t.a"}, {"task": "t.b"}]}),
    ):
        reply = (await rpc(client, call(method, params))).json()
        assert "result" in reply, (method, reply)


async def test_add_job_with_start_true_queues_at_once(memory_served: Served) -> None:
    reply = (
        await rpc(memory_served.client, call("queue_add_job", {"task": "t.x", "start": True}))
    ).json()
    job = await memory_served.app.get_job(reply["result"]["job_id"])
    assert job is not None
    assert job.state == "queued"


async def test_application_errors_use_the_error_table_codes(memory_served: Served) -> None:
    client = memory_served.client
    missing = (await rpc(client, call("queue_get_job_status", {"job_id": "nope"}))).json()
    assert missing["error"]["code"] == -32000 + ErrorCode.JOB_NOT_FOUND
    assert missing["error"]["data"]["type"] == "JobNotFound"
    job_id = (await rpc(client, call("queue_add_job", {"task": "t.x"}))).json()["result"]["job_id"]
    await rpc(client, call("queue_start_job", {"job_id": job_id}))
    twice = (await rpc(client, call("queue_start_job", {"job_id": job_id}))).json()
    assert twice["error"]["code"] == -32000 + ErrorCode.INVALID_TRANSITION
    deep: list[Any] = []
    for _ in range(80):
        deep = [deep]
    payload = (await rpc(client, call("queue_add_job", {"task": "t.x", "args": deep}))).json()
    assert payload["error"]["code"] == -32011


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", -32700),
        (b'{"jsonrpc": "2.0", "method": "queue_health", "id": 1', -32700),
        (b"\xff\xfe{}", -32700),
        (b'\xef\xbb\xbf{"jsonrpc": "2.0", "method": "queue_health", "id": 1}', -32700),
        (b'{"jsonrpc": "2.0", /* c */ "method": "queue_health", "id": 1}', -32700),
        (b'{"jsonrpc": "2.0", "method": "queue_health", "id": NaN}', -32700),
        (b'{"jsonrpc": "2.0", "method": "queue_health", "id": ' + b"9" * 5000 + b"}", -32700),
        (b"[" * 100_000 + b"]" * 100_000, -32700),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, -32700),
        (b'"\\ud800"', -32700),
        (b"[]", -32600),
        (b"5", -32600),
    ],
    ids=[
        "truncated",
        "unterminated",
        "utf16-bom",
        "utf8-bom",
        "comment",
        "nan",
        "huge-int",
        "deep-array",
        "deep-object",
        "lone-surrogate",
        "empty-batch",
        "not-an-object",
    ],
)
async def test_malformed_bodies_get_a_jsonrpc_error_not_a_5xx(
    memory_served: Served, body: bytes, code: int
) -> None:
    response = await memory_served.client.post("/rpc", content=body, headers=JSON)
    assert 400 <= response.status_code < 500 or response.status_code == 200
    assert "Traceback" not in response.text
    reply = response.json()
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] is None
    assert reply["error"]["code"] == code


@pytest.mark.parametrize(
    "message",
    [
        {"method": "queue_health", "id": 1},
        {"jsonrpc": "1.0", "method": "queue_health", "id": 1},
        {"jsonrpc": "2.0", "method": 5, "id": 1},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "method": "queue_health", "id": {"a": 1}},
        {"jsonrpc": "2.0", "method": "queue_health", "id": True},
        {"jsonrpc": "2.0", "method": "queue_health", "id": 1.5},
        {"jsonrpc": "2.0", "method": "queue_health", "params": "x", "id": 1},
        {"jsonrpc": "2.0", "method": "queue_health", "params": 3, "id": 1},
    ],
)
async def test_invalid_envelopes_are_32600(memory_served: Served, message: dict[str, Any]) -> None:
    reply = (await rpc(memory_served.client, message)).json()
    assert reply["error"]["code"] == -32600


async def test_unknown_method_is_32601(memory_served: Served) -> None:
    reply = (await rpc(memory_served.client, call("queue_nope", id_="x"))).json()
    assert reply == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": reply["error"]["message"]},
        "id": "x",
    }
    assert "queue_add_job" in reply["error"]["message"]
    long = (await rpc(memory_served.client, call("m" * 10_000))).json()
    assert len(long["error"]["message"]) < 1000


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"task": "t.x", "priority": "urgent"}, "priority"),
        ({"task": "t.x", "extra": 1}, "extra"),
        ({"task": 5}, "task"),
        ({}, "task"),
        ({"task": "t.x", "max_attempts": 0}, "max_attempts"),
        ({"task": "t.x", "queue": "bad queue"}, "queue"),
        ({"task": "t.x", "delay_s": -1}, "delay_s"),
        ({"task": "t.x", "kwargs": []}, "kwargs"),
    ],
)
async def test_invalid_params_are_32602_with_the_field_path(
    memory_served: Served, params: dict[str, Any], path: str
) -> None:
    reply = (await rpc(memory_served.client, call("queue_add_job", params))).json()
    assert reply["error"]["code"] == -32602
    paths = [field["path"] for field in reply["error"]["data"]["fields"]]
    assert path in paths
    assert path in reply["error"]["message"]


async def test_positional_params_and_their_arity(memory_served: Served) -> None:
    client = memory_served.client
    nested = (
        await rpc(client, call("queue_add_jobs", {"jobs": [{"task": "t.x", "priority": 1}]}))
    ).json()
    assert nested["error"]["data"]["fields"][0]["path"] == "jobs.0.priority"
    too_many = (await rpc(client, call("queue_get_job_status", ["a", "b"]))).json()
    assert too_many["error"]["code"] == -32602
    assert "at most 1" in too_many["error"]["message"]


async def test_batches_reply_in_order_and_skip_notifications(memory_served: Served) -> None:
    batch = [
        call("queue_health", id_=1),
        call("queue_health", id_=None),  # a notification: no reply
        {"foo": "bar"},
        call("queue_nope", id_="n"),
        5,
        [call("queue_health", id_=2)],  # a nested batch is just an invalid request
    ]
    response = await rpc(memory_served.client, batch)
    replies = response.json()
    assert [r["id"] for r in replies] == [1, None, "n", None, None]
    assert "result" in replies[0]
    assert [r["error"]["code"] for r in replies[1:]] == [-32600, -32601, -32600, -32600]


async def test_only_notifications_get_204_and_still_run(memory_served: Served) -> None:
    client = memory_served.client
    response = await client.post(
        "/rpc", json=[call("queue_add_job", {"task": "t.n", "start": True}, id_=None)] * 3
    )
    assert response.status_code == 204
    assert response.content == b""
    single = await client.post("/rpc", json=call("queue_nope", id_=None))
    assert single.status_code == 204  # errors of notifications are not reported either
    assert (await memory_served.app.counts())["default"]["queued"] == 3


async def test_batch_over_the_cap_is_one_error(memory_served: Served) -> None:
    response = await memory_served.client.post("/rpc", json=[call("queue_health")] * 101)
    assert response.status_code == 400
    reply = response.json()
    assert reply["error"]["code"] == -32600
    assert "cap of 100" in reply["error"]["message"]
    huge = await memory_served.client.post("/rpc", json=[1] * 10_000)
    assert huge.status_code == 400


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json; charset=utf-16"],
)
async def test_wrong_content_type_is_415_in_jsonrpc_shape(
    memory_served: Served, content_type: str
) -> None:
    response = await memory_served.client.post(
        "/rpc",
        content=b'{"jsonrpc": "2.0", "method": "queue_health", "id": 1}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == -32600


async def test_missing_content_type_is_415_too(memory_served: Served) -> None:
    response = await memory_served.client.post("/rpc", content=b'{"jsonrpc": "2.0"}')
    assert "content-type" not in response.request.headers
    assert response.status_code == 415
