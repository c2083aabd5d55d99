"""The JSON-RPC 2.0 envelope under generated input, against the real app over ASGI.

Whatever the body (valid and invalid envelopes, batches empty, over the cap, nested or made only
of notifications, wrong parameter types, bytes that are not JSON), the reply is never a 5xx and
never ``-32603``; envelope errors carry the JSON-RPC 2.0 codes (-32700 parse, -32600 invalid
request, -32601 unknown method, -32602 invalid params) and operation failures an application code
in -32099..-32000; each request gets its reply with its id, in order; notifications get no reply
(a body made only of them is ``204`` with no body); and every reply comes within a second.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from conveyor.service.operations import OPERATIONS

from .conftest import Portal, Reply, fuzz_settings
from .strategies import json_values

ENVELOPE_CODES: Final = {-32700, -32600, -32601, -32602}
BATCH_CAP: Final = 100  # ServiceSettings.rpc_batch_cap's default
ABSENT: Final[Any] = object()
_encode = msgspec.json.Encoder().encode
JSON: Final = {"content-type": "application/json"}

_FIELDS = sorted({name for op in OPERATIONS.values() for name in op.params.model_fields})
small_json = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
# Parameter values that often fit (ids, task and queue names, states) and often do not.
param_values = st.one_of(
    small_json,
    st.sampled_from(["j1", "missing", "demo.greet", "default", "failed", "pending", "high"]),
    st.lists(st.sampled_from(["failed", "queued", "nope"]), max_size=3),
)
params = st.one_of(
    st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), param_values, max_size=4),
    st.lists(param_values, max_size=4),
    json_values,  # mostly not an object or an array: -32600
)
ids = st.one_of(
    st.integers(), st.text(max_size=12), st.none(), st.floats(), st.booleans(), st.lists(st.none())
)
methods = st.one_of(
    st.sampled_from(list(OPERATIONS)), st.text(max_size=20), small_json, st.just("rpc.discover")
)


@st.composite
def envelopes(draw: st.DrawFn) -> Any:
    """A request object, valid or not in any of its members, or any other JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    message: dict[str, Any] = {}
    for key, values, weight in (
        ("jsonrpc", st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0, None]), 9),
        ("method", methods, 9),
        ("params", params, 6),
        ("id", ids, 7),
    ):
        if draw(st.integers(0, 9)) < weight:
            message[key] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        message[draw(st.text(max_size=6))] = draw(small_json)  # an unknown member: ignored
    return message


def expected(message: Any) -> tuple[str, Any, set[int]]:
    """What ``message`` must get: ("none"|"reply", reply id, allowed error codes or {0}=result)."""
    if not isinstance(message, dict):
        return "reply", None, {-32600}
    id_ = message.get("id", ABSENT)
    id_ok = id_ is ABSENT or id_ is None or type(id_) in (int, str)
    reply_id = id_ if id_ok and id_ is not ABSENT else None
    method = message.get("method")
    params = message.get("params", ABSENT)
    if (
        message.get("jsonrpc") != "2.0"
        or not id_ok
        or not isinstance(method, str)
        or (params is not ABSENT and not isinstance(params, dict | list))
    ):
        return "reply", reply_id, {-32600}
    if id_ is ABSENT:
        return "none", None, set()
    if method not in OPERATIONS:
        return "reply", id_, {-32601}
    return "reply", id_, {0, -32602, *range(-32099, -31999)}


def check_reply(reply: Any, want_id: Any, codes: set[int]) -> None:
    """One reply object: the 2.0 shape, the id echoed, a result or an allowed error code."""
    assert isinstance(reply, dict)
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] == want_id
    assert type(reply["id"]) is type(want_id)
    assert ("result" in reply) != ("error" in reply), reply
    if "result" in reply:
        assert 0 in codes, reply
    else:
        error = reply["error"]
        assert isinstance(error["message"], str)
        assert error["message"]
        assert error["code"] in codes, (error, codes)


def post(portal: Portal, body: bytes) -> Reply:
    """POST ``body`` to /rpc; the reply after the checks every reply passes."""
    reply = portal.request("POST", "/rpc", content=body, headers=JSON)
    assert reply.status < 500, reply.body[:500]
    if reply.elapsed_s > 1.0:
        # A slow input is slow again; a busy machine (2 shared cores) is not, so one resend
        # tells them apart.
        again = portal.request("POST", "/rpc", content=body, headers=JSON)
        assert again.elapsed_s <= 1.0, f"{again.elapsed_s:.2f} s for {body[:200]!r}"
    if reply.status == 204:
        assert reply.body == b""
    return reply


@fuzz_settings(80)
@given(message=envelopes().filter(lambda m: not isinstance(m, list)))  # a list is a batch
def test_single_envelopes_get_the_reply_the_spec_requires(portal: Portal, message: Any) -> None:
    body = _encode(message)
    reply = post(portal, body)
    kind, want_id, codes = expected(msgspec.json.decode(body))  # as sent: inf and nan are null
    if kind == "none":
        assert reply.status == 204
        return
    assert reply.status == 200
    check_reply(reply.json(), want_id, codes)


@fuzz_settings(40)
@given(batch=st.lists(envelopes() | st.lists(envelopes(), max_size=2), max_size=8))
def test_batches_reply_in_order_and_leave_out_notifications(
    portal: Portal, batch: list[Any]
) -> None:
    body = _encode(batch)
    reply = post(portal, body)
    batch = msgspec.json.decode(body)  # as sent: inf and nan are null
    if not batch:
        assert reply.status == 400
        check_reply(reply.json(), None, {-32600})
        return
    wanted = [expected(item) for item in batch]
    replies = [(want_id, codes) for kind, want_id, codes in wanted if kind == "reply"]
    if not replies:
        assert reply.status == 204
        return
    assert reply.status == 200
    document = reply.json()
    assert isinstance(document, list)
    assert len(document) == len(replies)
    for got, (want_id, codes) in zip(document, replies, strict=True):
        check_reply(got, want_id, codes)


@fuzz_settings(20)
@given(size=st.integers(BATCH_CAP + 1, BATCH_CAP * 3), notify=st.booleans())
def test_batches_over_the_cap_are_refused_whole(portal: Portal, size: int, notify: bool) -> None:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": "queue_health"}
    if not notify:
        call["id"] = 1
    reply = post(portal, _encode([call] * size))
    assert reply.status == 400
    check_reply(reply.json(), None, {-32600})
    assert f"{size} calls" in reply.json()["error"]["message"]


@fuzz_settings(100)
@given(body=st.binary(max_size=120) | st.text(max_size=60).map(str.encode))
def test_bytes_that_are_not_json_are_parse_errors(portal: Portal, body: bytes) -> None:
    reply = post(portal, body)
    try:
        msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        assert reply.status == 400
        check_reply(reply.json(), None, {-32700})
        return
    assert reply.status in (200, 204, 400)  # valid JSON: judged as an envelope above


HOSTILE: Final = [
    b"\xef\xbb\xbf" + b'{"jsonrpc": "2.0", "method": "queue_health", "id": 1}',  # a BOM
    b'{"jsonrpc": "2.0", "method": "queue_health", "id": NaN}',
    b'{"jsonrpc": "2.0", "method": "queue_health", "params": {"counts": Infinity}, "id": 1}',
    b'{"jsonrpc": "2.0", "method": "queue_health", "id": ' + b"9" * 5000 + b"}",
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b'{"jsonrpc": "2.0", "method": "queue_health", "id": "\xff\xfe"}',
]


def test_hostile_bodies_are_parse_errors(portal: Portal) -> None:
    for body in HOSTILE:
        reply = post(portal, body)
        assert reply.status == 400, body[:80]
        check_reply(reply.json(), None, {-32700})


def test_lone_surrogate_escapes_are_a_parse_error_or_a_clean_refusal(portal: Portal) -> None:
    body = b'{"jsonrpc": "2.0", "method": "queue_add_job", "id": 7, "params": {"task": "\\ud800"}}'
    reply = post(portal, body)
    if reply.status == 400:
        check_reply(reply.json(), None, {-32700})
    else:
        check_reply(reply.json(), 7, {-32602})


@fuzz_settings(60)
@given(
    method=st.sampled_from(list(OPERATIONS)),
    params=st.dictionaries(st.sampled_from(_FIELDS), param_values, min_size=1, max_size=4),
    positional=st.booleans(),
)
def test_wrong_param_types_are_invalid_params_naming_the_field(
    portal: Portal, method: str, params: dict[str, Any], positional: bool
) -> None:
    names = list(OPERATIONS[method].params.model_fields)
    sent: Any = params
    if positional:
        sent = [params.get(name) for name in names][: len(params)]
    message = {"jsonrpc": "2.0", "method": method, "params": sent, "id": "x"}
    document = post(portal, _encode(message)).json()
    check_reply(document, "x", {0, -32602, *range(-32099, -31999)})
    error = document.get("error")
    if error and error["code"] == -32602 and "fields" in (error.get("data") or {}):
        assert all(isinstance(f["path"], str) and f["msg"] for f in error["data"]["fields"])
