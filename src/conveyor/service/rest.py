"""The REST face: routes onto :mod:`.operations`, and the one JSON error shape for every error.

Every error is ``{"error": {"code", "message", "type"}}`` with the right status. Routes hold no
logic: each builds the operation's parameter model and calls :func:`~.operations.invoke`,
exactly as JSON-RPC does. Results are serialized by pydantic straight
to JSON (no second validation pass), and every status a route can answer is declared, so the
OpenAPI document is the contract clients (and the schemathesis suite) check against.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import Discriminator, Field, Tag
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.errors import ConveyorError, http_status
from conveyor.service import schemas as s
from conveyor.service.health import render_metrics
from conveyor.service.jsonrpc import parse_json
from conveyor.service.operations import OPERATIONS, Service, invoke
from conveyor.service.security import error_document, route_path

logger = logging.getLogger(__name__)

_DESCRIPTIONS: Final = {
    400: "The body is not valid JSON (UTF-8, no NaN or Infinity).",
    401: "Missing or invalid bearer token.",
    403: "The server is reachable beyond loopback without a token configured.",
    404: "No job with this id.",
    409: "The job's state does not allow this.",
    413: "Request body (or a job payload) over the size cap.",
    415: "The body is not JSON (send Content-Type: application/json).",
    422: "Invalid parameters; ``error.fields`` names each invalid field.",
    429: "Rate limited (or the queue is full); see Retry-After.",
    503: "The broker is unreachable; see Retry-After.",
}
_COMMON: Final = (401, 403, 422, 429, 503)
_BODY: Final = (400, 413, 415)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": s.ErrorBody, "description": _DESCRIPTIONS[code]}
        for code in sorted({*_COMMON, *codes})
    }


# OpenAPI links: from a response that names a job to the operations on that job, so stateful
# clients (and schemathesis' stateful phase) chain real ids instead of guessing them.
_JOB_OPERATIONS: Final = {
    "GetJob": "#/paths/~1jobs~1{job_id}/get",
    "DeleteJob": "#/paths/~1jobs~1{job_id}/delete",
    "GetJobLogs": "#/paths/~1jobs~1{job_id}~1logs/get",
    "StartJob": "#/paths/~1jobs~1{job_id}~1start/post",
    "StopJob": "#/paths/~1jobs~1{job_id}~1stop/post",
    "RetryJob": "#/paths/~1jobs~1{job_id}~1retry/post",
}


def _linked(status: int, job_id: str, queue: str | None = None) -> dict[int | str, Any]:
    """A ``responses`` entry for ``status`` whose links pass ``job_id`` (a runtime expression)."""
    links: dict[str, Any] = {
        name: {"operationRef": ref, "parameters": {"job_id": job_id}}
        for name, ref in _JOB_OPERATIONS.items()
    }
    if queue is not None:
        links["PurgeQueue"] = {
            "operationRef": "#/paths/~1queues~1{queue}/delete",
            "parameters": {"queue": queue},
        }
        links["CountQueue"] = {
            "operationRef": "#/paths/~1queues/get",
            "parameters": {"query.queue": queue},
        }
    return {status: {"description": "Successful Response", "links": links}}


def _json(model: s.Result, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status, media_type="application/json")


async def _run(request: Request, method: str, params: s.Params, status: int = 200) -> Response:
    service: Service = request.app.state.service
    return _json(await invoke(service, OPERATIONS[method], params), status)


class _StrictJSONRequest(Request):
    """A request whose JSON body is parsed strictly (see :func:`.jsonrpc.parse_json`)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except ValueError as exc:
                raise HTTPException(
                    400, f"invalid JSON body: {exc}; send one UTF-8 JSON document"
                ) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed strictly, by msgspec.

    Python's json module would accept NaN and lone surrogates (which then fail deep inside a
    broker, as a 500), and it is slower.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, given a request whose ``json()`` is strict."""
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


router = APIRouter(route_class=StrictJSONRoute)

JobIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The job's id.")]
QueuePath = Annotated[s.QueueName, Path(description="The queue's name.")]
OneOrMany = Annotated[
    Annotated[s.JobSpec, Tag("job")]
    | Annotated[
        Annotated[list[s.JobSpec], Field(min_length=1, max_length=s.MAX_BATCH)], Tag("jobs")
    ],
    Discriminator(lambda value: "jobs" if isinstance(value, list) else "job"),
]

# -- jobs ------------------------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=201,
    response_model=s.Enqueued | s.EnqueuedBatch,
    responses={**_errors(*_BODY), **_linked(201, "$response.body#/job_id")},
    tags=["jobs"],
    summary="Enqueue one job, or a batch (a JSON array, all or nothing)",
)
async def add_jobs(request: Request, body: Annotated[OneOrMany, Body()]) -> Response:
    """One job object -> ``{"job_id"}``; an array of up to 1000 -> ``{"job_ids"}`` in order.

    ``start: false`` holds a job as ``pending`` until ``POST /jobs/{id}/start``.
    """
    if isinstance(body, list):
        return await _run(request, "queue_add_jobs", s.JobBatch(jobs=body), 201)
    return await _run(request, "queue_add_job", body, 201)


@router.get(
    "/jobs",
    response_model=s.JobPageOut,
    responses=_errors(),
    tags=["jobs"],
    summary="List jobs (filter by queue, state, task; cursor pagination)",
)
async def list_jobs(request: Request, query: Annotated[s.ListQuery, Query()]) -> Response:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    return await _run(request, "queue_list_jobs", query)


@router.get(
    "/jobs/{job_id}",
    response_model=s.JobOut,
    responses={**_errors(404), **_linked(200, "$response.body#/id", "$response.body#/queue")},
    tags=["jobs"],
    summary="A job's state, progress, result and error",
)
async def get_job(request: Request, job_id: JobIdPath) -> Response:
    """The job's record (404 once it is deleted or cleaned up)."""
    return await _run(request, "queue_get_job_status", s.JobRef(job_id=job_id))


@router.get(
    "/jobs/{job_id}/logs",
    response_model=s.LogsOut,
    responses=_errors(404),
    tags=["jobs"],
    summary="A job's captured log lines",
)
async def job_logs(
    request: Request, job_id: JobIdPath, query: Annotated[s.LogsQuery, Query()]
) -> Response:
    """Kept lines from ``offset`` (0 = oldest kept); ``dropped`` counts lines the cap removed."""
    params = s.LogsParams(job_id=job_id, **query.model_dump())
    return await _run(request, "queue_get_job_logs", params)


def _transition(path: str, method: str, summary: str, codes: tuple[int, ...]) -> None:
    async def endpoint(request: Request, job_id: JobIdPath) -> Response:
        return await _run(request, method, s.JobRef(job_id=job_id))

    endpoint.__name__ = method.removeprefix("queue_")
    endpoint.__doc__ = OPERATIONS[method].summary
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        response_model=OPERATIONS[method].result,
        responses={**_errors(*codes), **_linked(200, "$response.body#/id")},
        tags=["jobs"],
        summary=summary,
    )


_transition("/jobs/{job_id}/start", "queue_start_job", "Start a pending job", (404, 409))
_transition("/jobs/{job_id}/stop", "queue_stop_job", "Stop (cancel) a job", (404, 409))
_transition("/jobs/{job_id}/retry", "queue_retry_job", "Retry a failed or stopped job", (404, 409))


@router.delete(
    "/jobs/{job_id}",
    response_model=s.Deleted,
    responses=_errors(404),
    tags=["jobs"],
    summary="Delete a job and its logs",
)
async def delete_job(request: Request, job_id: JobIdPath) -> Response:
    """Removes the job in any state; a running job's lease is revoked."""
    return await _run(request, "queue_delete_job", s.JobRef(job_id=job_id))


# -- queues and dead letters -----------------------------------------------------------------------


@router.get(
    "/queues",
    response_model=s.CountsOut,
    responses=_errors(),
    tags=["queues"],
    summary="Jobs per state, per queue",
)
async def counts(request: Request, query: Annotated[s.CountsQuery, Query()]) -> Response:
    """Every state is present in each row, zeros included."""
    return await _run(request, "queue_counts", query)


@router.delete(
    "/queues/{queue}",
    response_model=s.Purged,
    responses=_errors(),
    tags=["queues"],
    summary="Purge a queue",
)
async def purge(
    request: Request, queue: QueuePath, query: Annotated[s.PurgeQuery, Query()]
) -> Response:
    """Deletes jobs not yet started (or those in ``state``); running jobs are never purged."""
    return await _run(request, "queue_purge", s.PurgeParams(queue=queue, **query.model_dump()))


@router.get(
    "/dead-letters",
    response_model=s.JobPageOut,
    responses=_errors(),
    tags=["dead letters"],
    summary="List dead letters (failed jobs)",
)
async def dead_letters(request: Request, query: Annotated[s.DeadLetterQuery, Query()]) -> Response:
    """Newest first, with error, traceback and failure reason."""
    return await _run(request, "queue_list_dead_letters", query)


@router.post(
    "/dead-letters/redrive",
    response_model=s.Redriven,
    responses=_errors(*_BODY),
    tags=["dead letters"],
    summary="Send dead letters back to work",
)
async def redrive(
    request: Request, body: Annotated[s.RedriveParams | None, Body()] = None
) -> Response:
    """Every failed job of ``queue`` (or of all queues), or just ``job_ids``; attempts reset."""
    return await _run(request, "queue_redrive", body or s.RedriveParams())


# -- operations ------------------------------------------------------------------------------------


@router.get(
    "/health",
    response_model=s.HealthOut,
    tags=["operations"],
    summary="Service health (no token needed)",
    responses={
        422: {"model": s.ErrorBody, "description": _DESCRIPTIONS[422]},
        503: {"model": s.HealthOut, "description": "Broker unreachable or a worker is down."},
    },
)
async def health(request: Request, query: Annotated[s.HealthQuery, Query()]) -> Response:
    """Broker reachability and circuit, workers alive and consuming, event stream, loop lag."""
    service: Service = request.app.state.service
    report = await invoke(service, OPERATIONS["queue_health"], query)
    assert isinstance(report, s.HealthOut)
    return _json(report, 503 if report.status == "unavailable" else 200)


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(),
    },
)
async def metrics(request: Request) -> Response:
    """The service's, the queues' and the in-process workers' metrics (Prometheus text)."""
    body = await render_metrics(request.app.state.service)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


# -- errors ----------------------------------------------------------------------------------------

_STATUS_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def snake(name: str) -> str:
    """``JobNotFound`` -> ``job_not_found``: the stable ``code`` of an error class."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _error(
    request: Request, status: int, code: str, message: str, type_: str, **extra: Any
) -> Response:
    body = error_document(route_path(request.scope), status, code, message, type_, **extra)
    return Response(json.dumps(body), status, media_type="application/json")


async def _conveyor_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConveyorError)
    status = http_status(exc)
    response = _error(request, status, snake(type(exc).__name__), exc.message, type(exc).__name__)
    if status == 503:
        service: Service = request.app.state.service
        response.headers["Retry-After"] = str(service.guard.retry_after_s())
    elif status == 429:
        response.headers["Retry-After"] = "1"
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    fields = [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    where = "; ".join(f"{'.'.join(map(str, f['loc']))}: {f['msg']}" for f in fields[:5])
    message = f"invalid request ({where}); fix the fields listed in error.fields"
    return _error(
        request, 422, "validation_error", message[:2000], "ValidationError", fields=fields[:50]
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    message = str(exc.detail)
    if status == 404 and message == "Not Found":
        message = (
            f"no route {request.method} {route_path(request.scope)}; the API is listed at /docs"
        )
    elif status == 405:
        message = f"{request.method} is not allowed here; see the Allow header"
    code = _STATUS_CODES.get(status, f"http_{status}")
    response = _error(request, status, code, message[:2000], "HTTPException")
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 JSON error, never a traceback.

    The body carries a reference to the one log line with the traceback. Unlike Starlette's own
    error handling, the exception is not re-raised into the server (which would log it twice).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; answer 500 if it raised before a response started."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            reference = uuid.uuid4().hex[:12]
            path = route_path(scope)
            logger.error(
                "unhandled error in %s %s (reference %s)",
                scope.get("method"),
                path,
                reference,
                exc_info=exc,
                extra={"action": "http_error"},
            )
            if started:
                return  # the response is under way: all that can be done is to end it
            message = f"internal error (reference {reference}); the server log has the details"
            body = json.dumps(error_document(path, 500, "internal_error", message, "InternalError"))
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode()})


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one JSON error shape (never a traceback, never HTML)."""
    app.add_exception_handler(ConveyorError, _conveyor_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
