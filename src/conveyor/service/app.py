"""``create_app``: the FastAPI app, and the lifespan that owns its broker, workers and loops.

The lifespan (not the deprecated startup/shutdown events) connects the broker, starts the shared
event subscription and the loop-lag monitor as tasks it owns, then the in-process workers, and
returns: nothing in startup waits on a subscriber or on the broker answering (an unreachable
broker means 503s until it answers, not a server that never starts). Shutdown is ordered and
bounded: end the event streams, stop the workers (their grace period), cancel the loops, close
the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from conveyor import __version__
from conveyor.client import Conveyor
from conveyor.errors import BrokerUnavailable, ConfigurationError
from conveyor.service import dashboard, events, jsonrpc, rest
from conveyor.service.admission import AdmissionControl
from conveyor.service.events import EventHub
from conveyor.service.health import RequestMetrics, monitor_loop_lag
from conveyor.service.operations import EnqueueBatcher, Service, ServiceSettings, WorkerLike
from conveyor.service.security import (
    PUBLIC_PATHS,
    TOKEN_ENV,
    BrokerGuard,
    RateLimiter,
    SecurityMiddleware,
)

logger = logging.getLogger(__name__)

WorkerFactory = Callable[[Conveyor], WorkerLike]
_BODY_OVERHEAD_BYTES = 64 * 1024

_DESCRIPTION = """\
Enqueue, inspect, stop, retry and delete jobs; watch them live; operate queues and dead letters.

* **Auth**: when the server has a token, send `Authorization: Bearer <token>` on every route but
  `/health` (event streams also take `?token=`).
* **Errors**: `{"error": {"code", "message", "type"}}`; 422 adds `error.fields`; 429 and 503 send
  `Retry-After`.
* **JSON-RPC 2.0** at `POST /rpc` offers the same operations under seed 004's `queue_*` names.
* **Live events**: `GET /events` (SSE) and `WS /events/ws`, filterable by `queue` and `job_id`,
  resumable with `Last-Event-ID` / `?after=`.
"""


def _default_worker(app: Conveyor) -> WorkerLike:
    try:
        from conveyor.worker.worker import Worker
    except ImportError as exc:  # pragma: no cover - the worker ships with conveyor
        raise ConfigurationError(f"in-process workers are unavailable: {exc}") from None
    worker: WorkerLike = Worker(app)
    return worker


def _check(settings: ServiceSettings) -> None:
    if settings.event_history < 2 or not 0 < settings.event_max_lag < settings.event_history:
        raise ConfigurationError("need 0 < event_max_lag < event_history")
    if settings.rpc_batch_cap < 1 or settings.broker_timeout_s <= 0:
        raise ConfigurationError("rpc_batch_cap must be >= 1 and broker_timeout_s > 0")


def create_app(
    app: Conveyor | None = None,
    *,
    url: str | None = None,
    workers: int = 0,
    token: str | None = None,
    settings: ServiceSettings | None = None,
    worker_factory: WorkerFactory | None = None,
) -> FastAPI:
    """The conveyor HTTP service as a FastAPI app.

    Args:
        app: the Conveyor app to serve (its registered tasks are what in-process workers run).
        url: or a broker URL to build a bare app from (enqueue by task name only).
        workers: in-process workers started by the lifespan (they need ``app``'s tasks).
        token: bearer token (default: ``settings.token``, then ``$CONVEYOR_TOKEN``).
        settings: limits and timeouts (see :class:`ServiceSettings`).
        worker_factory: builds each worker (default: ``conveyor.worker.worker.Worker(app)``).

    To mount it inside another FastAPI app, enter its lifespan from the parent's, since
    Starlette does not run a mounted app's lifespan::

        service = create_app(conveyor_app, token=...)

        @asynccontextmanager
        async def lifespan(parent):
            async with service.router.lifespan_context(service):
                yield

        parent = FastAPI(lifespan=lifespan)
        parent.mount("/queue", service)
    """
    if app is not None and url is not None:
        raise ConfigurationError("pass either app or url to create_app, not both")
    if workers < 0:
        raise ConfigurationError(f"workers must be >= 0, got {workers}")
    conveyor = app or Conveyor(url)
    settings = settings or ServiceSettings()
    settings = replace(settings, token=token or settings.token or os.environ.get(TOKEN_ENV) or None)
    _check(settings)
    max_body = settings.max_body_bytes or (
        conveyor.broker.codec.max_payload_bytes + _BODY_OVERHEAD_BYTES
    )
    service = Service(
        app=conveyor,
        settings=settings,
        hub=EventHub(conveyor.broker, settings),
        enqueuer=EnqueueBatcher(conveyor, timeout_s=settings.broker_timeout_s),
        guard=BrokerGuard(settings.breaker_cooldown_s),
    )
    api = FastAPI(
        title="conveyor",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=_lifespan,
    )
    api.state.service = service
    api.state.worker_count = workers
    api.state.worker_factory = worker_factory or _default_worker
    rest.install_error_handlers(api)
    api.include_router(rest.router)
    api.include_router(jsonrpc.router)
    api.include_router(events.router)
    api.include_router(dashboard.router)
    limiter = None
    if settings.rate_limit_per_s:
        limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_burst)
    api.add_middleware(
        SecurityMiddleware, token=settings.token, limiter=limiter, max_body_bytes=max_body
    )
    if settings.max_in_flight:  # outside the guards: refusing costs less than checking a token
        api.add_middleware(AdmissionControl, max_in_flight=settings.max_in_flight)
    api.add_middleware(RequestMetrics, stats=service.http)  # counts refusals too
    api.add_middleware(rest.InternalErrors)  # outermost: nothing escapes as a bare 500
    api.openapi = lambda: _openapi(api)  # type: ignore[method-assign]
    return api


def _openapi(api: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the bearer scheme (auth is middleware, invisible to FastAPI)."""
    if api.openapi_schema is None:
        doc = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        if api.state.service.settings.token:
            components = doc.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
            }
            doc["security"] = [{"bearer": []}]
            for path in PUBLIC_PATHS:
                for operation in doc["paths"].get(path, {}).values():
                    operation["security"] = []
        api.openapi_schema = doc
    return api.openapi_schema


@contextlib.asynccontextmanager
async def _lifespan(api: FastAPI) -> AsyncIterator[None]:
    service: Service = api.state.service
    tasks = [
        asyncio.create_task(service.hub.run(connect=service.app.connect), name="conveyor-events"),
        asyncio.create_task(monitor_loop_lag(service), name="conveyor-loop-lag"),
    ]
    try:
        await _connect(service)
        for _ in range(api.state.worker_count):
            worker = api.state.worker_factory(service.app)
            await worker.start()
            service.workers.append(worker)
        yield
    finally:
        await _shutdown(service, tasks)


async def _connect(service: Service) -> None:
    try:
        async with asyncio.timeout(service.settings.broker_timeout_s):
            await service.app.connect()
    except (BrokerUnavailable, TimeoutError) as exc:
        service.guard.failure(exc)
        logger.warning(
            "service: the broker is unreachable at startup (%s); answering 503 until it is",
            exc or "timed out",
            extra={"action": "connect"},
        )


async def _shutdown(service: Service, tasks: list[asyncio.Task[None]]) -> None:
    """Ordered and bounded; each step runs even if an earlier one failed."""
    service.hub.close()  # streams end now, so the server is not kept waiting on them
    await service.enqueuer.close(service.settings.broker_timeout_s)
    for worker in reversed(service.workers):
        try:
            async with asyncio.timeout(service.settings.worker_grace_s):
                await worker.stop()
        except Exception:
            logger.exception("service: a worker did not stop cleanly")
    service.workers.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await service.app.close()
