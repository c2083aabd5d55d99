"""JSON-RPC 2.0 at ``POST /rpc``: seed 004's ``queue_*`` methods over :mod:`.operations`.

The body is parsed here, not by FastAPI, so every malformed input gets a JSON-RPC error rather
than a framework error: invalid JSON, invalid UTF-8, a BOM, NaN/Infinity, integers beyond 4,300
digits and nesting deeper than the parser's recursion limit are all ``-32700`` (HTTP 400); an
envelope that is not a request object is ``-32600``; an unknown method ``-32601``; parameters that
do not fit the method's model ``-32602`` with each field's path in ``error.data.fields``; and
failures of the operation carry the application code of :func:`conveyor.errors.rpc_code`.
Batches are capped (``rpc_batch_cap``) and run in order; notifications (no ``id``) get no reply,
and a request made only of notifications gets ``204 No Content``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Final

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from conveyor.errors import BrokerUnavailable, ConveyorError, rpc_code
from conveyor.service import schemas as s
from conveyor.service.operations import OPERATIONS, Operation, Service, invoke

logger = logging.getLogger(__name__)

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

_ABSENT: Final[Any] = object()
_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode
_METHODS: Final = ", ".join(OPERATIONS)


class _ParseError(Exception):
    pass


def parse_json(body: bytes) -> Any:
    """Decode a request body strictly (RFC 8259, UTF-8); raises ValueError with a short reason.

    msgspec rejects what Python's json module lets through (NaN, Infinity, lone surrogates) and
    turns the pathological inputs into errors instead of crashes: too deep -> RecursionError,
    too many digits -> ValidationError.
    """
    try:
        return _decode(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)[:200]) from None


def _error(id_: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": id_}


def _field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {
            "path": ".".join(str(part) for part in e["loc"]) or "params",
            "loc": list(e["loc"]),
            "msg": e["msg"],
            "type": e["type"],
        }
        for e in exc.errors(include_url=False, include_input=False, include_context=False)[:50]
    ]


def _params(op: Operation, params: Any) -> s.Params:
    """Map by-name (object) or by-position (array) params onto the operation's model."""
    if params is _ABSENT:
        params = {}
    elif isinstance(params, list):
        names = list(op.params.model_fields)
        if len(params) > len(names):
            raise _TooMany(op, len(params), names)
        params = dict(zip(names, params, strict=False))
    return op.params.model_validate(params)


class _TooMany(Exception):
    def __init__(self, op: Operation, given: int, names: list[str]) -> None:
        super().__init__(
            f"{op.method} takes at most {len(names)} positional params ({', '.join(names)}), "
            f"got {given}; pass an object to name them"
        )


async def call(service: Service, message: Any) -> dict[str, Any] | None:
    """Handle one request object; the reply, or None for a notification."""
    if not isinstance(message, dict):
        return _error(None, INVALID_REQUEST, "invalid request: expected a JSON-RPC request object")
    id_ = message.get("id", _ABSENT)
    id_ok = id_ is _ABSENT or id_ is None or (type(id_) in (int, str))
    reply_id = id_ if id_ok and id_ is not _ABSENT else None
    if message.get("jsonrpc") != "2.0":
        return _error(reply_id, INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    if not id_ok:
        return _error(
            None, INVALID_REQUEST, 'invalid request: "id" must be a string, an integer or null'
        )
    method = message.get("method")
    if not isinstance(method, str):
        return _error(reply_id, INVALID_REQUEST, 'invalid request: "method" must be a string')
    params = message.get("params", _ABSENT)
    if params is not _ABSENT and not isinstance(params, dict | list):
        return _error(
            reply_id, INVALID_REQUEST, 'invalid request: "params" must be an object or an array'
        )
    reply = await _dispatch(service, method, params)
    if id_ is _ABSENT:
        return None  # a notification: the spec forbids any reply, errors included
    reply["id"] = id_
    return reply


async def _dispatch(service: Service, method: str, params: Any) -> dict[str, Any]:
    op = OPERATIONS.get(method)
    if op is None:
        shown = method if len(method) <= 64 else method[:64] + "..."
        return _error(None, METHOD_NOT_FOUND, f"method not found: {shown!r}; methods: {_METHODS}")
    try:
        parsed = _params(op, params)
    except _TooMany as exc:
        return _error(None, INVALID_PARAMS, f"invalid params: {exc}")
    except ValidationError as exc:
        fields = _field_errors(exc)
        first = fields[0]
        message = f"invalid params for {method}: {first['path']}: {first['msg']}"
        return _error(None, INVALID_PARAMS, message, {"fields": fields})
    try:
        result = await invoke(service, op, parsed)
    except ConveyorError as exc:
        data: dict[str, Any] = {"type": type(exc).__name__}
        if isinstance(exc, BrokerUnavailable):
            data["retry_after_s"] = service.guard.retry_after_s()
        return _error(None, rpc_code(exc), exc.message, data)
    except Exception:
        reference = uuid.uuid4().hex[:12]
        logger.exception(
            "JSON-RPC %s failed (reference %s)", method, reference, extra={"action": method}
        )
        return _error(
            None,
            INTERNAL_ERROR,
            f"internal error (reference {reference}); the server log has the details",
        )
    return {"jsonrpc": "2.0", "result": result.model_dump(mode="json"), "id": None}


async def handle(service: Service, body: bytes) -> tuple[int, Any]:
    """A whole HTTP request body -> (HTTP status, reply document or None for no content)."""
    try:
        message = parse_json(body)
    except ValueError as exc:
        hint = "send one JSON-RPC 2.0 request object, or an array of them, as UTF-8 JSON"
        return 400, _error(None, PARSE_ERROR, f"parse error: {exc}; {hint}")
    if isinstance(message, list):
        cap = service.settings.rpc_batch_cap
        if not message:
            return 400, _error(None, INVALID_REQUEST, "invalid request: empty batch")
        if len(message) > cap:
            text = f"invalid request: a batch of {len(message)} calls is over the cap of {cap}"
            text += "; split it"
            return 400, _error(None, INVALID_REQUEST, text)
        replies = [reply for item in message if (reply := await call(service, item)) is not None]
        return (200, replies) if replies else (204, None)
    reply = await call(service, message)
    return (200, reply) if reply is not None else (204, None)


# -- the route and its OpenAPI description --------------------------------------------------------

_REQUEST_SCHEMA: Final = {
    "type": "object",
    "required": ["jsonrpc", "method"],
    "properties": {
        "jsonrpc": {"type": "string", "enum": ["2.0"]},
        "method": {"type": "string", "enum": list(OPERATIONS)},
        "params": {"oneOf": [{"type": "object"}, {"type": "array"}]},
        "id": {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    },
}
_REPLY_SCHEMA: Final = {
    "type": "object",
    "required": ["jsonrpc", "id"],
    "properties": {
        "jsonrpc": {"type": "string", "enum": ["2.0"]},
        "result": {},
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "data": {}},
        },
        "id": {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    },
}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_REPLIES: Final = {"oneOf": [_REPLY_SCHEMA, {"type": "array", "items": _REPLY_SCHEMA}]}

router = APIRouter(tags=["json-rpc"])


@router.post(
    "/rpc",
    summary="JSON-RPC 2.0 (seed 004's queue_* methods; batches; notifications)",
    response_class=Response,
    openapi_extra={
        "requestBody": {
            "required": True,
            **_content({"oneOf": [_REQUEST_SCHEMA, {"type": "array", "items": _REQUEST_SCHEMA}]}),
        }
    },
    responses={
        200: {"description": "A reply, or an array of replies for a batch.", **_content(_REPLIES)},
        204: {"description": "Only notifications were sent: nothing to reply."},
        400: {
            "description": "Parse error (-32700) or invalid batch (-32600).",
            **_content(_REPLY_SCHEMA),
        },
        401: {"description": "Missing or invalid bearer token.", **_content(_REPLY_SCHEMA)},
        403: {
            "description": "Reachable beyond loopback without a token.",
            **_content(_REPLY_SCHEMA),
        },
        413: {"description": "Request body over the cap.", **_content(_REPLY_SCHEMA)},
        415: {"description": "Not JSON.", **_content(_REPLY_SCHEMA)},
        429: {"description": "Rate limited; see Retry-After.", **_content(_REPLY_SCHEMA)},
    },
)
async def rpc(request: Request) -> Response:
    """One JSON-RPC 2.0 request, or a batch of them.

    Methods: queue_add_job, queue_start_job, queue_stop_job, queue_delete_job,
    queue_get_job_status, queue_get_job_logs, queue_list_jobs, queue_health, queue_add_jobs,
    queue_retry_job, queue_counts, queue_purge, queue_list_dead_letters, queue_redrive.
    """
    status, document = await handle(request.app.state.service, await request.body())
    if document is None:
        return Response(status_code=status)
    return Response(_encode(document), status, media_type="application/json")
