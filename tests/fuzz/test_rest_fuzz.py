"""The REST bodies, paths and queries under generated input, against the real app over ASGI.

Never a 5xx; every error is the one JSON error shape; a 201 from ``POST /jobs`` names jobs that
then read back with exactly the arguments sent.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from conveyor.service import schemas as s

from .conftest import Portal, Reply, fuzz_settings
from .strategies import json_values

_encode = msgspec.json.Encoder().encode
JSON: Final = {"content-type": "application/json"}

field_values = st.one_of(
    json_values,
    st.sampled_from(["demo.greet", "default", "high", "low", "j-1", "", "a" * 300]),
    st.integers(-5, 2000),
    st.floats(-10, 1e9),
)
_SPEC_FIELDS = list(s.JobSpec.model_fields)
job_specs = st.one_of(
    # mostly-valid specs with some fields replaced by generated values
    st.fixed_dictionaries(
        {"task": st.sampled_from(["demo.greet", "app.tasks.send"])},
        optional={name: field_values for name in _SPEC_FIELDS if name != "task"},
    ),
    st.dictionaries(st.sampled_from(_SPEC_FIELDS) | st.text(max_size=6), field_values, max_size=5),
)
bodies = st.one_of(job_specs, st.lists(job_specs, max_size=4), json_values)


def check(reply: Reply, *allowed: int) -> Any:
    """No 5xx, a status in ``allowed``, and the error shape on every error; the JSON body."""
    assert reply.status < 500, reply.body[:500]
    assert reply.status in allowed, (reply.status, reply.body[:500])
    document = reply.json()
    if reply.status >= 400:
        error = document["error"]
        assert isinstance(error["code"], str)
        assert isinstance(error["message"], str)
        assert error["message"]
        assert isinstance(error["type"], str)
    return document


@fuzz_settings(60)
@given(body=bodies)
def test_enqueue_bodies_never_get_a_server_error(portal: Portal, body: Any) -> None:
    reply = portal.request("POST", "/jobs", content=_encode(body), headers=JSON)
    document = check(reply, 201, 404, 409, 413, 422)
    if reply.status != 201:
        return
    sent = body if isinstance(body, list) else [body]
    ids = document.get("job_ids") or [document["job_id"]]
    assert len(ids) == len(sent)
    for job_id, spec in zip(ids, sent, strict=True):
        job = check(portal.request("GET", f"/jobs/{quote(job_id, safe='')}"), 200)
        assert job["args"] == spec.get("args", [])
        assert job["kwargs"] == spec.get("kwargs", {})


@fuzz_settings(40)
@given(
    body=st.one_of(
        st.none(), json_values, st.dictionaries(st.sampled_from(["queue", "job_ids"]), field_values)
    )
)
def test_redrive_bodies_never_get_a_server_error(portal: Portal, body: Any) -> None:
    content = b"" if body is None else _encode(body)
    reply = portal.request("POST", "/dead-letters/redrive", content=content, headers=JSON)
    check(reply, 200, 404, 422)


@fuzz_settings(60)
@given(
    # Routing sees the decoded path, so a "/" (even as %2F) splits the id into two segments and
    # names another route; ids the API issues or accepts (NewJobId) never hold one. "." and ".."
    # are dot segments, which the client removes before sending.
    job_id=st.text(
        st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=140
    ).filter(lambda v: v not in {".", ".."}),
    action=st.sampled_from(
        [
            ("GET", ""),
            ("DELETE", ""),
            ("GET", "/logs"),
            ("POST", "/start"),
            ("POST", "/stop"),
            ("POST", "/retry"),
        ]
    ),
)
def test_job_ids_in_the_path_never_get_a_server_error(
    portal: Portal, job_id: str, action: tuple[str, str]
) -> None:
    method, suffix = action
    reply = portal.request(method, f"/jobs/{quote(job_id, safe='')}{suffix}")
    check(reply, 200, 404, 409, 422)


@fuzz_settings(60)
@given(
    query=st.dictionaries(
        st.sampled_from(["queue", "state", "task", "limit", "cursor", "offset", "counts", "x"]),
        st.text(max_size=20) | st.integers().map(str),
        max_size=4,
    ),
    path=st.sampled_from(["/jobs", "/dead-letters", "/queues", "/health", "/jobs/j1/logs"]),
)
def test_queries_never_get_a_server_error(portal: Portal, query: dict[str, str], path: str) -> None:
    reply = portal.request("GET", path, params=query)
    check(reply, 200, 404, 422)


@fuzz_settings(40)
@given(
    args=st.lists(json_values, max_size=4),
    kwargs=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    start=st.booleans(),
)
def test_valid_jobs_are_accepted_and_read_back_exactly(
    portal: Portal, args: list[Any], kwargs: dict[str, Any], start: bool
) -> None:
    body = {"task": "app.tasks.send", "args": args, "kwargs": kwargs, "start": start}
    created = check(portal.request("POST", "/jobs", content=_encode(body), headers=JSON), 201)
    job = check(portal.request("GET", f"/jobs/{created['job_id']}"), 200)
    assert job["args"] == args
    assert job["kwargs"] == kwargs
    assert job["state"] == ("queued" if start else "pending")
