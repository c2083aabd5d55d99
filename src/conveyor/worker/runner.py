"""The runner: runs one reserved job, decides its outcome, has it stored, then runs its callbacks.

* The task is resolved from ``app.registry`` only; nothing is ever imported on a payload's say-so.
* A job that cannot even start (unknown task, arguments that do not bind the task's signature, a
  malformed payload) goes to dead letters at once with reason ``system_error``: never discarded,
  never retried N times for a fault no retry can fix.
* Otherwise it runs in its executor with the job's ``timeout_s`` (the registered task's when the
  job has none: a job enqueued by name where the task is not registered, e.g. from the CLI or
  the HTTP service, is stored without the task's options). Success is acked (through the
  committer's batch) once the result is known to be storable; an exception goes to the job's
  :class:`~conveyor.retry.RetryPolicy` (the task's when the job stores none; see
  :meth:`RetryPolicy.for_job <conveyor.retry.RetryPolicy.for_job>` for the attempt cap), whose
  decision is stored as ``retry`` or ``dead_letter`` with the error (``"Type: message"``) and the
  traceback text. A process child that died
  (:class:`WorkerLostError`) counts as a failed attempt; if that ends in dead letters the reason
  is ``poison``.
* When its lease is lost (cancelled, deleted, re-delivered) the run is cancelled and nothing is
  stored; at shutdown a cancelled run is left for the worker to ``release``.
* After the outcome is stored, ``on_success``/``on_failure`` callbacks (registered task names)
  run inline with a timeout; a failing callback is logged and counted and changes nothing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from conveyor.codec import UndecodablePayload
from conveyor.context import JobContext
from conveyor.errors import PayloadError
from conveyor.job import FailureReason, Job
from conveyor.retry import Retry, RetryDecision, RetryPolicy
from conveyor.worker.fetcher import Slots
from conveyor.worker.interfaces import Executor, JobTimeoutError, RemoteError, WorkerLostError
from conveyor.worker.leases import LEASE_LOST, SHUTDOWN, ActiveJob, Outcome, Phase

if TYPE_CHECKING:
    from conveyor.client import Conveyor
    from conveyor.metrics import JobSeries
    from conveyor.task import Task
    from conveyor.worker.committer import Committer
    from conveyor.worker.reporter import BrokerReporter

logger = logging.getLogger(__name__)

#: How long flushing a job's buffered logs before its outcome may take.
REPORT_FLUSH_TIMEOUT_S: Final = 2.0


class CannotStart(Exception):  # an internal signal, never seen by users
    """The job cannot run at all (its message says why)."""


class Runner:
    """Runs jobs for one worker.

    Args:
        app: the application (registry, broker codec and clock).
        executors: the started executors by kind.
        slots: capacity bookkeeping shared with the fetcher.
        committer: stores outcomes.
        reporter: the jobs' progress/log sink.
        callback_timeout_s: the bound on each on_success/on_failure callback.
        worker_id: for log lines.
    """

    def __init__(
        self,
        app: Conveyor,
        *,
        executors: Mapping[str, Executor],
        slots: Slots,
        committer: Committer,
        reporter: BrokerReporter,
        callback_timeout_s: float,
        worker_id: str = "",
    ) -> None:
        self._app = app
        self._registry = app.registry
        self._codec = app.broker.codec
        self._clock = app.broker.clock
        self._executors = executors
        self._slots = slots
        self._committer = committer
        self._reporter = reporter
        self.callback_timeout_s = callback_timeout_s
        self.worker_id = worker_id
        self._arg_checks: dict[str, _ArgCheck] = {}

    # -- one job ---------------------------------------------------------------------------------

    async def run_job(self, aj: ActiveJob) -> None:
        """Run ``aj`` to a stored outcome (or to a stop); never raises except CancelledError."""
        job = aj.job
        series = aj.series
        slots = self._slots
        try:
            task, executor = self._resolve(aj)
        except CannotStart as exc:
            slots.fulfil(aj)
            await self._cannot_start(aj, str(exc))
            return
        if executor.free_slots <= 0:
            await slots.wait_free(executor)
        if aj.stop_reason is not None:
            # Lease lost or shutdown before it started: nothing ran, nothing to store here.
            slots.fulfil(aj)
            slots.freed()
            self._stopped(aj)
            return
        ctx = JobContext(job, self._reporter)
        aj.ctx = ctx
        aj.phase = Phase.RUNNING
        slots.fulfil(aj)
        started = time.perf_counter()
        timeout_s = job.timeout_s if job.timeout_s is not None else task.options.timeout_s
        try:
            result = await executor.run(task, ctx, timeout_s)
        except asyncio.CancelledError:
            ctx.cancel()
            slots.freed()
            series.run_time.observe(time.perf_counter() - started)
            self._stopped(aj)
            raise
        except Exception as exc:
            slots.freed()
            series.run_time.observe(time.perf_counter() - started)
            if aj.phase is Phase.RUNNING:
                await self._failed(aj, exc, task.options.retry)
            return
        slots.freed()
        series.run_time.observe(time.perf_counter() - started)
        # A run that ignored its cancellation may finish after a shutdown gave the job back
        # (settled): its outcome is not recorded.
        if aj.phase is Phase.RUNNING:
            await self._succeeded(aj, result, task.options.retry)

    def _resolve(self, aj: ActiveJob) -> tuple[Task[Any, Any], Executor]:
        job = aj.job
        if isinstance(job.args, UndecodablePayload):  # the broker could not decode its payload
            raise CannotStart(job.args.reason)
        task = self._registry.find(job.task)
        if task is None:
            raise CannotStart(
                f"UnknownTask: no task named {job.task!r} is registered in this worker"
            )
        executor = self._executors.get(aj.kind) if aj.kind is not None else None
        if executor is None:
            raise CannotStart(
                f"ConfigurationError: task {job.task!r} needs the {task.options.executor!r} "
                "executor, which this worker did not start"
            )
        if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
            raise CannotStart("PayloadError: args must be a list and kwargs a dict")
        check = self._arg_checks.get(job.task)
        if check is None:
            check = self._arg_checks[job.task] = _ArgCheck(task.signature)
        if not job.kwargs and check.min_args <= len(job.args) <= check.max_args:
            return task, executor  # the common case, without Signature.bind's cost
        try:
            check.signature.bind(*job.args, **job.kwargs)
        except TypeError as exc:
            raise CannotStart(
                f"TypeError: arguments do not fit task {job.task!r}{check.signature}: {exc}"
            ) from None
        return task, executor

    # -- outcomes --------------------------------------------------------------------------------

    async def _succeeded(
        self, aj: ActiveJob, result: Any, task_policy: RetryPolicy | None = None
    ) -> None:
        job = aj.job
        if result is not None:
            try:
                self._codec.check_value(result, what=f"the result of job {job.id} ({job.task})")
            except PayloadError as exc:
                await self._failed(aj, exc, task_policy)
                return
        if self._reporter.has_pending(job.id):
            await self._flush_reports(job)
        aj.phase = Phase.COMMITTING
        if job.on_success is None:
            self._committer.ack(aj, result)
            return
        waiter = aj.waiter = asyncio.get_running_loop().create_future()
        self._committer.ack(aj, result)
        if await waiter is Outcome.COMPLETED:
            payload = _callback_payload(job, "completed", result, None, job.attempts + 1)
            await self._callback(job.on_success, payload, aj.series)

    async def _failed(
        self, aj: ActiveJob, exc: BaseException, task_policy: RetryPolicy | None = None
    ) -> None:
        job = aj.job
        series = aj.series
        series.failed += 1
        timed_out = isinstance(exc, JobTimeoutError)
        if timed_out:
            series.timeouts += 1
        policy = RetryPolicy.for_job(job, task_policy)
        decision = policy.decide(
            job,
            policy_view(exc),
            self._clock.now_ms(),
            timed_out=timed_out,
            max_attempts=policy.max_attempts,
        )
        error, trace = describe(exc)
        if self._reporter.has_pending(job.id):
            await self._flush_reports(job)
        aj.phase = Phase.COMMITTING
        extra = {"job_id": job.id, "queue": job.queue}
        if isinstance(decision, RetryDecision):
            delay_s = max(0, decision.run_at_ms - self._clock.now_ms()) / 1000
            logger.info(
                "job %s (%s) attempt %d failed: %s; retrying in %.1f s",
                job.id,
                job.task,
                job.attempts + 1,
                error,
                delay_s,
                extra={"action": "retry", **extra},
            )
            await self._committer.retry(
                aj, run_at_ms=decision.run_at_ms, error=error, traceback=trace
            )
            return
        reason = FailureReason.POISON if isinstance(exc, WorkerLostError) else decision.reason
        logger.warning(
            "job %s (%s) failed on attempt %d of %d and goes to dead letters (%s): %s",
            job.id,
            job.task,
            job.attempts + 1,
            policy.max_attempts,
            reason,
            error,
            extra={"action": "dead_letter", **extra},
        )
        stored = await self._committer.dead_letter(aj, reason=reason, error=error, traceback=trace)
        if stored is not None and job.on_failure is not None:
            payload = _callback_payload(stored, "failed", None, error, stored.attempts)
            await self._callback(job.on_failure, payload, series)

    async def _cannot_start(self, aj: ActiveJob, error: str) -> None:
        job = aj.job
        aj.series.failed += 1
        aj.phase = Phase.COMMITTING
        logger.warning(
            "job %s cannot start and goes to dead letters (system_error): %s",
            job.id,
            error,
            extra={"action": "dead_letter", "job_id": job.id, "queue": job.queue},
        )
        stored = await self._committer.dead_letter(
            aj, reason=FailureReason.SYSTEM_ERROR, error=error, traceback=None
        )
        if stored is not None and job.on_failure is not None:
            payload = _callback_payload(stored, "failed", None, error, stored.attempts)
            await self._callback(job.on_failure, payload, aj.series)

    def _stopped(self, aj: ActiveJob) -> None:
        """The run was stopped: a lost lease is dropped here; anything else is left to release."""
        if aj.stop_reason == LEASE_LOST:
            logger.info(
                "job %s stopped: its lease was revoked (cancelled, deleted or re-delivered)",
                aj.job.id,
                extra={"action": "cancel", "job_id": aj.job.id, "queue": aj.job.queue},
            )
            self._committer.drop(aj)
        elif aj.stop_reason is None:
            aj.stop_reason = SHUTDOWN  # cancelled from outside: the worker releases it

    async def _flush_reports(self, job: Job) -> None:
        try:
            async with asyncio.timeout(REPORT_FLUSH_TIMEOUT_S):
                await self._reporter.flush(job.id)
        except TimeoutError:
            logger.warning(
                "job %s: its last log lines could not be stored in time",
                job.id,
                extra={"action": "append_log", "job_id": job.id, "queue": job.queue},
            )

    # -- callbacks -------------------------------------------------------------------------------

    async def _callback(self, name: str, payload: dict[str, Any], series: JobSeries) -> None:
        """Run a registered callback with the outcome; failures are logged and counted only."""
        extra = {"action": "callback", "job_id": payload["job_id"], "queue": payload["queue"]}
        callback = self._registry.find(name)
        if callback is None:
            series.callback_failures += 1
            logger.warning(
                "job %s: callback %r is not a registered task; skipped",
                payload["job_id"],
                name,
                extra=extra,
            )
            return
        try:
            async with asyncio.timeout(self.callback_timeout_s):
                if callback.is_async:
                    await callback.fn(payload)
                else:
                    # Sync callbacks must not block the loop; on timeout the thread is abandoned.
                    await asyncio.to_thread(callback.fn, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            series.callback_failures += 1
            logger.exception(
                "job %s: callback %r failed (the job's outcome stands)",
                payload["job_id"],
                name,
                extra=extra,
            )


class _ArgCheck:
    """How many positional arguments a task accepts when given no keyword arguments.

    ``min_args <= len(args) <= max_args`` is exactly what ``Signature.bind(*args)`` accepts,
    unless a keyword-only parameter is required (then ``max_args`` is -1: always bind).
    """

    __slots__ = ("max_args", "min_args", "signature")

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.min_args = sum(1 for p in positional if p.default is p.empty)
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            self.max_args = sys.maxsize
        else:
            self.max_args = len(positional)
        if any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
            self.max_args = -1


def _callback_payload(
    job: Job, state: str, result: Any, error: str | None, attempts: int
) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "task": job.task,
        "queue": job.queue,
        "state": state,
        "result": result,
        "error": error,
        "attempts": attempts,
        "args": list(job.args),
        "kwargs": dict(job.kwargs),
    }


# -- errors --------------------------------------------------------------------------------------


def _type_name(cls: type[BaseException]) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


#: Stored error text is capped: a job raising a multi-megabyte message must not bloat every read
#: of its record (the API returns it whole). The message keeps its start, the traceback its end
#: (the innermost frames and the exception line are what one reads).
MAX_ERROR_CHARS = 8 * 1024
MAX_TRACEBACK_CHARS = 64 * 1024


def describe(exc: BaseException) -> tuple[str, str]:
    """The stored form of a failure: ``("Type: message", traceback text)``, both capped."""
    if isinstance(exc, RemoteError):
        text = str(exc)
        error, trace = text.removeprefix("builtins."), exc.remote_traceback
    else:
        message = str(exc)
        name = _type_name(type(exc))
        error = f"{name}: {message}" if message else name
        trace = "".join(traceback.format_exception(exc))
    return cap_head(error, MAX_ERROR_CHARS), cap_tail(trace, MAX_TRACEBACK_CHARS)


def cap_head(text: str, limit: int) -> str:
    """``text`` cut to its first ``limit`` characters, saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit} more characters cut]"


def cap_tail(text: str, limit: int) -> str:
    """``text`` cut to its last ``limit`` characters, saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"[{len(text) - limit} earlier characters cut ...]\n{text[-limit:]}"


_REMOTE_CLASSES: dict[str, type[BaseException]] = {}


def policy_view(exc: BaseException) -> BaseException:
    """What the retry policy matches: for a child's exception, a stand-in of its original class.

    ``retry_on``/``give_up_on`` name exception classes; a :class:`RemoteError` names the child's
    class in ``remote_type``. If that class is already loaded here (builtins, or a module this
    worker imported) the stand-in is a real instance of it, so base classes match too
    (``retry_on=[OSError]`` catches a child's ``ConnectionError``); otherwise it is a proxy class
    with the same name. Nothing is imported because a payload said so.
    """
    if not isinstance(exc, RemoteError):
        return exc
    retry_delay = getattr(exc, "delay_s", None)
    cls = _remote_class(exc.remote_type)
    if issubclass(cls, Retry):
        return Retry(retry_delay if isinstance(retry_delay, int | float) else None)
    return cls.__new__(cls)


def _remote_class(remote_type: str) -> type[BaseException]:
    cls = _REMOTE_CLASSES.get(remote_type)
    if cls is not None:
        return cls
    parts = remote_type.split(".")
    found: type[BaseException] | None = None
    for i in range(len(parts) - 1, -1, -1):
        module = sys.modules.get(".".join(parts[:i]) if i else "builtins")
        if module is None:
            continue
        obj: Any = module
        for name in parts[i:]:
            obj = getattr(obj, name, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            found = obj
        break
    if found is None:
        module_name, _, qualname = remote_type.rpartition(".")
        found = type(
            qualname or remote_type,
            (Exception,),
            {"__module__": module_name or "builtins", "__qualname__": qualname or remote_type},
        )
    if len(_REMOTE_CLASSES) < 1024:  # bounded: remote type names come from task code
        _REMOTE_CLASSES[remote_type] = found
    return found


__all__ = ["LEASE_LOST", "SHUTDOWN", "CannotStart", "Runner", "describe", "policy_view"]
