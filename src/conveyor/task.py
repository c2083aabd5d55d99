"""Tasks: registered functions with their options, the per-app registry, and typed enqueueing."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar

import msgspec

from conveyor.errors import ConfigurationError, UnknownTask
from conveyor.job import Priority, validate_queue_name, validate_task_name
from conveyor.retry import RetryPolicy

if TYPE_CHECKING:
    from conveyor.client import Conveyor, JobHandle, JobRequest

P = ParamSpec("P")
R = TypeVar("R")

ExecutorKind = Literal["async", "thread", "process"]
EXECUTOR_KINDS: tuple[ExecutorKind, ...] = ("async", "thread", "process")


class TaskOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How a task's jobs are enqueued and run (defaults for every job of the task).

    Attributes:
        queue: queue its jobs go to.
        priority: high, normal or low.
        retry: retry policy (default: exponential, 3 attempts).
        timeout_s: a run longer than this fails with a timeout (None: no limit).
        executor: where it runs: ``async`` (coroutines on the loop), ``thread`` (bounded thread
            pool for sync code), ``process`` (spawned processes for CPU work and isolation).
        on_success / on_failure: names of registered tasks run after the outcome is stored.
        max_lost_leases: how many times the job may kill its worker before it is poison.
    """

    queue: str = "default"
    priority: Priority = Priority.NORMAL
    retry: RetryPolicy | None = None
    timeout_s: float | None = None
    executor: ExecutorKind = "async"
    on_success: str | None = None
    on_failure: str | None = None
    max_lost_leases: int = 3


def _takes_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn``'s first parameter is the job context (named ``ctx`` or typed JobContext)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params:
        return False
    first = params[0]
    if first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return False
    annotation = first.annotation
    if isinstance(annotation, str):
        return annotation.split(".")[-1] == "JobContext" or first.name == "ctx"
    return first.name == "ctx" or getattr(annotation, "__name__", "") == "JobContext"


class Task(Generic[P, R]):
    """A registered function. Call ``await task.enqueue(*args, **kwargs)`` to run it as a job.

    Calling the task object directly runs the function in-process (useful in tests).
    """

    def __init__(
        self,
        app: Conveyor,
        fn: Callable[..., Any],
        name: str,
        options: TaskOptions,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = validate_task_name(name)
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.takes_context = _takes_context(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - the function's own doc
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} executor={self.options.executor} queue={self.options.queue}>"

    @property
    def signature(self) -> inspect.Signature:
        """The signature callers must match (without the context parameter)."""
        sig = inspect.signature(self.fn)
        if self.takes_context:
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        return sig

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise TypeError if ``args``/``kwargs`` do not fit the task's signature."""
        self.signature.bind(*args, **kwargs)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Enqueue one job of this task with the task's default options."""
        return await self.app.enqueue(self, args=list(args), kwargs=dict(kwargs))

    def request(self, *args: P.args, **kwargs: P.kwargs) -> JobRequest:
        """A job of this task ready for :meth:`Conveyor.enqueue_many` (a batch in one call)."""
        return self.app.request(self, args=list(args), kwargs=dict(kwargs))

    def enqueue_sync(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Enqueue from sync code (through the app's sync client); returns the job id."""
        return self.app.sync.enqueue(self.name, args=list(args), kwargs=dict(kwargs))

    def options_for_call(
        self,
        *,
        delay_s: float | None = None,
        priority: str | Priority | None = None,
        dedup_key: str | None = None,
        max_attempts: int | None = None,
        queue: str | None = None,
        timeout_s: float | None = None,
        job_id: str | None = None,
        pending: bool = False,
    ) -> BoundCall[P, R]:
        """Options for one call: ``await task.options_for_call(delay_s=5).enqueue(x)``."""
        return BoundCall(
            self,
            {
                "delay_s": delay_s,
                "priority": priority,
                "dedup_key": dedup_key,
                "max_attempts": max_attempts,
                "queue": queue,
                "timeout_s": timeout_s,
                "job_id": job_id,
                "pending": pending,
            },
        )

    with_options = options_for_call

    async def run_inline(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now (no broker), awaiting it if it is a coroutine."""
        result = self.fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


class BoundCall(Generic[P, R]):
    """A task with per-call options; made by :meth:`Task.options_for_call`."""

    def __init__(self, task: Task[P, R], options: dict[str, Any]) -> None:
        self.task = task
        self.options = options

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Enqueue one job with these options."""
        return await self.task.app.enqueue(
            self.task, args=list(args), kwargs=dict(kwargs), **self.options
        )

    def request(self, *args: P.args, **kwargs: P.kwargs) -> JobRequest:
        """A job with these options, ready for :meth:`Conveyor.enqueue_many`."""
        return self.task.app.request(
            self.task, args=list(args), kwargs=dict(kwargs), **self.options
        )


class TaskRegistry:
    """The tasks one app knows, by name. Workers run only these (never an import from a payload)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any, Any]] = {}

    def add(self, task: Task[Any, Any]) -> None:
        """Register ``task``; a second task with the same name is refused."""
        existing = self._tasks.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ConfigurationError(
                f"a task named {task.name!r} is already registered ({existing.fn!r}); "
                "give one of them another name with @app.task(name=...)"
            )
        self._tasks[task.name] = task

    def get(self, name: str) -> Task[Any, Any]:
        """The task registered as ``name``; raises UnknownTask."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(
                f"no task named {name!r} is registered; register it with @app.task "
                "or start the worker with the module that defines it"
            ) from None

    def find(self, name: str) -> Task[Any, Any] | None:
        """The task registered as ``name``, or None."""
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task[Any, Any]]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._tasks)


def make_options(
    *,
    queue: str,
    priority: str | Priority,
    retry: RetryPolicy | None,
    max_attempts: int | None,
    timeout_s: float | None,
    executor: str | None,
    fn: Callable[..., Any],
    on_success: str | None,
    on_failure: str | None,
    max_lost_leases: int,
) -> TaskOptions:
    """Validate decorator arguments into :class:`TaskOptions` (errors say what to change)."""
    validate_queue_name(queue)
    kind = executor or ("async" if inspect.iscoroutinefunction(fn) else "thread")
    if kind not in EXECUTOR_KINDS:
        raise ConfigurationError(f"executor must be one of {EXECUTOR_KINDS}, got {kind!r}")
    if kind == "async" and not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"{fn.__qualname__} is not an async function; use executor='thread' or 'process'"
        )
    if kind == "process" and ("<locals>" in fn.__qualname__ or fn.__module__ == "__main__"):
        raise ConfigurationError(
            f"{fn.__qualname__} runs in spawned processes, which import it by module; "
            "define it at module level in an importable module (not __main__ or a function body)"
        )
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigurationError(f"timeout_s must be > 0, got {timeout_s}")
    if max_lost_leases < 1:
        raise ConfigurationError(f"max_lost_leases must be >= 1, got {max_lost_leases}")
    policy = retry
    if max_attempts is not None:
        policy = RetryPolicy((retry or RetryPolicy()).spec, max_attempts)
    return TaskOptions(
        queue=queue,
        priority=Priority.parse(priority),
        retry=policy,
        timeout_s=timeout_s,
        executor=kind,
        on_success=on_success,
        on_failure=on_failure,
        max_lost_leases=max_lost_leases,
    )


def callback_name(cb: Any) -> str | None:
    """The registered name a callback is stored under (a Task, a task name, or None)."""
    if cb is None:
        return None
    if isinstance(cb, Task):
        return cb.name
    if isinstance(cb, str):
        return validate_task_name(cb)
    raise ConfigurationError(
        f"callback {cb!r} must be a registered task or its name; register it with @app.task"
    )


def is_coroutine_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives an awaitable (async def, or an object with async __call__)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - we want the bound __call__ itself
    )
