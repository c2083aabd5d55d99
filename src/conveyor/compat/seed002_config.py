"""Seed 002's ``QueueConfig``: the shared conveyor app, processor/callback registration and metrics.

One :class:`QueueConfig` owns one :class:`~conveyor.Conveyor` app. The seed's managers and workers
shared a Redis client and a registry of importable names; here they share the app, whose task
registry is the only place a job's processor or callback is looked up (a payload never names
something to import).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

from conveyor.client import Conveyor
from conveyor.errors import ConfigurationError, UnknownTask
from conveyor.job import validate_queue_name
from conveyor.task import Task

if TYPE_CHECKING:
    from conveyor.sync import SyncClient

DEFAULT_BACKUP_TTL_S: Final = 86400 * 7
DEFAULT_TIMEOUT_S: Final = 30.0

#: The counters every status report shows, even before anything happened.
BASE_METRICS: Final = (
    "enqueued",
    "duplicates",
    "processed",
    "failed",
    "retried",
    "timeouts",
    "thread_pool_exhaustion",
)

_UNSAFE_NAME_PARTS: Final = re.compile(r"[^A-Za-z0-9_.:\-]")


class MetricsSource(Protocol):
    """A live source of figures for :meth:`QueueConfig.get_metrics` (a running QueueWorker)."""

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges to merge (counters add up across sources)."""
        ...


def task_name_for(
    fn: Callable[..., Any], name: str | None = None, module: str | None = None
) -> str:
    """The registered name of a processor or callback: ``module.qualname`` by default.

    Characters a task name may not hold (the ``<locals>`` of a nested function, a lambda's
    ``<lambda>``) are dropped, so any function gets a valid name.
    """
    qualname = name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not qualname:
        raise ConfigurationError(f"{fn!r} has no __qualname__; register it with a name=")
    mod = module if module is not None else getattr(fn, "__module__", None)
    full = f"{mod}.{qualname}" if mod else qualname
    return _UNSAFE_NAME_PARTS.sub("", full).strip(".")


class QueueConfig:
    """The shared configuration of seed 002's queue: which broker, names and metrics.

    It owns the conveyor app (``self.app``) that :class:`QueueManager` enqueues through and
    :class:`QueueWorker` runs. The broker is chosen by, in order: ``app`` (an existing app),
    ``url`` (any conveyor URL: ``sqlite:///PATH``, ``redis://...``), ``redis_url``,
    ``redis_client`` (its host, port, db and credentials are read; conveyor opens its own
    connections, one pool per event loop), else conveyor's default (``$CONVEYOR_URL`` or
    ``sqlite:///conveyor.db``).

    Args:
        redis_client: a ``redis.Redis`` / ``redis.asyncio.Redis`` whose address to use.
        redis_url: ``redis://host:port/db`` (or ``rediss://``).
        queue_prefix: prefix of the key names :meth:`QueueManager.get_queue_status` reports.
        backup_ttl: accepted for compatibility; conveyor keeps a running job's record in the
            broker under a lease, so there are no in-flight backup copies to expire.
        logger: where this face logs (default: this module's logger).
        connection_timeout: seconds to connect to / wait on Redis.
        max_connection_retries: how often :class:`QueueWorker` retries connecting at start, and
            the status/purge calls retry a broker that is unavailable.
        url: a conveyor broker URL (instead of ``redis_url``).
        app: an existing conveyor app to share (its tasks become usable processors).
        default_queue: the conveyor queue of operations enqueued without ``queue_name``
            (default: the app's, ``default``).
        default_timeout: seconds an operation may run when enqueued without ``timeout``
            (default: the ``work_timeout`` of a QueueWorker made on this config, else 30 s).
    """

    def __init__(
        self,
        redis_client: Any = None,
        redis_url: str | None = None,
        queue_prefix: str = "queue:",
        backup_ttl: int = DEFAULT_BACKUP_TTL_S,
        logger: logging.Logger | None = None,
        connection_timeout: float = 5.0,
        max_connection_retries: int = 3,
        *,
        url: str | None = None,
        app: Conveyor | None = None,
        default_queue: str | None = None,
        default_timeout: float | None = None,
    ) -> None:
        given = [n for n, v in (("app", app), ("url", url), ("redis_url", redis_url)) if v]
        if redis_client is not None:
            given.append("redis_client")
        if len(given) > 1:
            raise ConfigurationError(f"give one broker source, not {' and '.join(given)}")
        if connection_timeout <= 0:
            raise ConfigurationError(f"connection_timeout must be > 0, got {connection_timeout}")
        if max_connection_retries < 0:
            raise ConfigurationError("max_connection_retries must be >= 0")
        if default_timeout is not None and not default_timeout > 0:
            raise ConfigurationError(f"default_timeout must be > 0, got {default_timeout}")
        self.queue_prefix = queue_prefix
        self.backup_ttl = backup_ttl
        self.logger = logger or logging.getLogger(__name__)
        self.connection_timeout = connection_timeout
        self.max_connection_retries = max_connection_retries
        self.default_timeout = default_timeout
        #: Set by a QueueWorker made on this config (its ``work_timeout``).
        self.work_timeout: float | None = None
        if app is not None:
            self.app = app
        else:
            broker_url = url or redis_url
            if redis_client is not None:
                broker_url = redis_url_from_client(redis_client)
            options: dict[str, Any] = {}
            if broker_url and broker_url.startswith(("redis://", "rediss://")):
                options = {
                    "connect_timeout_s": connection_timeout,
                    "socket_timeout_s": connection_timeout,
                }
            self.app = Conveyor(broker_url, default_queue=default_queue or "default", **options)
        self.default_queue = validate_queue_name(default_queue or self.app.default_queue)
        #: Conveyor queues this config enqueued to (a QueueWorker consumes them all).
        self.queues: set[str] = {self.default_queue}
        self._metrics: dict[str, Any] = dict.fromkeys(BASE_METRICS, 0)
        self._metrics_lock = threading.Lock()
        self._sources: list[MetricsSource] = []
        self._sync: SyncClient | None = None
        self._define_queue_keys()

    def __repr__(self) -> str:
        return f"<QueueConfig url={self.app.url!r} queues={sorted(self.queues)}>"

    def _define_queue_keys(self) -> None:
        """The report keys of the dead-letter views (the seed's failure queues)."""
        self.failures_key = f"{self.queue_prefix}failures"
        self.system_errors_key = f"{self.queue_prefix}system_errors"

    # -- names -----------------------------------------------------------------------------------

    def get_queue_key(self, queue_name: str, priority: str = "normal") -> str:
        """The report key of a queue at a priority: ``{prefix}{priority}:{queue_name}``.

        Keys name what :meth:`QueueManager.get_queue_status` counts; conveyor's brokers keep
        their own layout (one queue holds all three priorities).
        """
        return f"{self.queue_prefix}{priority}:{queue_name}"

    def get_registry_key(self) -> str:
        """The key naming this config's registry (``{prefix}registry``), kept for the seed's API."""
        return f"{self.queue_prefix}registry"

    def get_callback_key(self, callback_name: str, callback_module: str | None = None) -> str:
        """The task name a callback is registered under: ``module.name`` (or ``name``)."""
        return f"{callback_module}.{callback_name}" if callback_module else callback_name

    def timeout_for(self, timeout: float | None) -> float:
        """The timeout stored with an operation: ``timeout``, else the config's default.

        The default is ``default_timeout`` if set, else the ``work_timeout`` of a QueueWorker
        made on this config, else 30 s. It travels with the job, so it is decided where the
        operation is enqueued.
        """
        for candidate in (timeout, self.default_timeout, self.work_timeout):
            if candidate is not None:
                return candidate
        return DEFAULT_TIMEOUT_S

    # -- registration ----------------------------------------------------------------------------

    def register_processor(
        self,
        processor: Callable[..., Any],
        name: str | None = None,
        module: str | None = None,
    ) -> Task[Any, Any]:
        """Register a processor as a task (async def: async executor; def: thread executor).

        Idempotent for the same function. The name defaults to ``module.qualname``; give
        ``name`` when two different functions would get the same one (closures made in a loop).
        Both executors enforce the job's timeout.
        """
        if isinstance(processor, Task):
            if processor.app is not self.app and processor.name not in self.app.registry:
                self.app.registry.add(processor)
            return processor
        if not callable(processor):
            raise ConfigurationError(
                f"a processor must be a function or a task name: {processor!r}"
            )
        task_name = task_name_for(processor, name, module)
        return self._register(processor, task_name)

    def register_callback(
        self,
        callback: Callable[..., Any],
        name: str | None = None,
        module: str | None = None,
    ) -> Task[Any, Any]:
        """Register an ``on_success`` / ``on_failure`` callback; it is called with the seed's dict.

        The dict holds ``operation_id``, ``entity``, ``result``, ``status`` (``completed`` or
        ``failed``), ``error``, ``queue``, ``processor`` and ``attempts``. An ``async def``
        callback runs on the worker's loop, a plain one in a thread; either is bounded by the
        worker's callback timeout. Returns the task (its name is :meth:`get_callback_key`).
        """
        from conveyor.compat.seed002_callbacks import ORIGINAL_ATTR, callback_task_function

        if isinstance(callback, Task):
            return callback
        if not callable(callback):
            raise ConfigurationError(f"a callback must be a function or a task name: {callback!r}")
        base = name or getattr(callback, "__qualname__", None)
        task_name = task_name_for(callback, base, module)
        existing = self.app.registry.find(task_name)
        if existing is not None and getattr(existing.fn, ORIGINAL_ATTR, None) == callback:
            return existing
        return self._register(callback_task_function(callback), task_name)

    def _register(self, fn: Callable[..., Any], task_name: str) -> Task[Any, Any]:
        existing = self.app.registry.find(task_name)
        if existing is not None:
            if existing.fn == fn:  # == : a bound method is a new object on each access
                return existing
            raise ConfigurationError(
                f"another function is already registered as {task_name!r}; register this one "
                "with config.register_processor(fn, name=...) (or register_callback) under "
                "its own name"
            )
        # The executor follows the function: coroutines on the loop, plain functions in the
        # bounded thread pool - both with the job's timeout (the seed ran sync code without one).
        executor = "async" if inspect.iscoroutinefunction(fn) else "thread"
        return self.app.task(name=task_name, executor=executor)(fn)

    def resolve(self, target: Callable[..., Any] | str, *, callback: bool = False) -> str:
        """The registered task name for a processor/callback given as a function or a name.

        A name must already be registered (by a function passed before, ``register_*``, or a
        module the worker was allowed to load): it is never imported. Raises UnknownTask.
        """
        if isinstance(target, str):
            if target in self.app.registry:
                return target
            raise UnknownTask(
                f"no processor or callback is registered as {target!r}; pass the function "
                "itself, register it with config.register_processor / register_callback, or "
                "list its module in QueueWorker(modules=[...])"
            )
        task = self.register_callback(target) if callback else self.register_processor(target)
        return task.name

    def register_module(self, module: Any) -> list[str]:
        """Register the public functions a module defines as processors; returns their names.

        Used by ``QueueWorker(modules=[...])``: the operator names the modules whose functions
        jobs may run. Functions imported into the module from elsewhere are skipped.
        """
        names = []
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or isinstance(value, Task):
                continue
            if inspect.isfunction(value) and value.__module__ == module.__name__:
                names.append(self.register_processor(value).name)
        return names

    # -- metrics ---------------------------------------------------------------------------------

    def update_metric(self, metric_name: str, value: Any = 1, force_log: bool = False) -> None:
        """Add ``value`` to a counter (numbers) or set it (anything else).

        Logged at INFO when ``force_log`` is set or a counter reaches a power of ten (1, 10,
        100, ...), at DEBUG otherwise, so busy counters do not flood the log.
        """
        with self._metrics_lock:
            current = self._metrics.get(metric_name, 0)
            if isinstance(value, int | float) and isinstance(current, int | float):
                new: Any = current + value
            else:
                new = value
            self._metrics[metric_name] = new
        milestone = isinstance(new, int) and new > 0 and math.log10(new).is_integer()
        self.logger.log(
            logging.INFO if force_log or milestone else logging.DEBUG,
            "metric %s = %s",
            metric_name,
            new,
            extra={"action": "metric", "metric": metric_name},
        )

    def add_metrics_source(self, source: MetricsSource) -> None:
        """Include a live source (a QueueWorker on this config) in :meth:`get_metrics`."""
        if source not in self._sources:
            self._sources.append(source)

    def remove_metrics_source(self, source: MetricsSource) -> None:
        """Stop including ``source``."""
        if source in self._sources:
            self._sources.remove(source)

    def get_metrics(self) -> dict[str, Any]:
        """The counters of this process and its workers, with ``success_rate`` and pool figures.

        ``success_rate`` is processed / (processed + failed) in percent (0.0 before any outcome).
        ``thread_pool_exhaustion`` stays 0: a conveyor worker reserves a sync job only when a
        thread is free, so a full pool means "don't fetch", never "fetch, then requeue";
        ``thread_pool_saturated`` says whether the pool is full right now.
        """
        with self._metrics_lock:
            merged: dict[str, Any] = dict(self._metrics)
        merged.setdefault("thread_pool_utilization", 0.0)
        merged.setdefault("thread_pool_saturated", False)
        for source in list(self._sources):
            for key, value in source.metrics().items():
                current = merged.get(key)
                if isinstance(value, bool):
                    merged[key] = bool(current) or value  # saturated if any worker is
                elif _is_count(value) and _is_count(current):
                    merged[key] = current + value  # counters and pool sizes add up
                else:
                    merged[key] = value
        size, busy = merged.get("thread_pool_size", 0), merged.get("thread_pool_busy", 0)
        if size:  # recomputed, so that several workers give the utilization of all their threads
            merged["thread_pool_utilization"] = round(100.0 * busy / size, 1)
        finished = merged["processed"] + merged["failed"]
        merged["success_rate"] = (
            round(100.0 * merged["processed"] / finished, 1) if finished else 0.0
        )
        return merged

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def sync(self) -> SyncClient:
        """The app's sync client (QueueManager's calls go through it)."""
        if self._sync is None:
            self._sync = self.app.sync
        return self._sync

    def close(self) -> None:
        """Close the sync client's connection and loop thread, if one was used (idempotent).

        From async code call :meth:`aclose`, which also closes the app's own broker connection.
        """
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        """Close the app (its broker connection and its sync client)."""
        await self.app.close()

    def track_queue(self, queue: str) -> str:
        """Remember a queue this config uses (so workers consume it); returns the name validated."""
        self.queues.add(validate_queue_name(queue))
        return queue

    def track_queues(self, queues: Iterable[str]) -> None:
        """:meth:`track_queue` for each."""
        for queue in queues:
            self.track_queue(queue)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def redis_url_from_client(client: Any) -> str:
    """The ``redis://`` URL of a redis-py client's connection pool (host, port, db, credentials)."""
    from urllib.parse import quote

    pool = getattr(client, "connection_pool", None)
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}) or {})
    if "path" in kwargs:
        raise ConfigurationError(
            "conveyor connects to Redis over TCP; pass redis_url='redis://host:port/db' instead of "
            "a unix-socket client"
        )
    if not kwargs.get("host"):
        raise ConfigurationError(f"cannot read a Redis address from {client!r}; pass redis_url=")
    connection_class = getattr(pool, "connection_class", None)
    scheme = "rediss" if "SSL" in getattr(connection_class, "__name__", "") else "redis"
    user = kwargs.get("username") or ""
    password = kwargs.get("password") or ""
    auth = ""
    if user or password:
        auth = f"{quote(str(user), safe='')}:{quote(str(password), safe='')}@"
    return f"{scheme}://{auth}{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
