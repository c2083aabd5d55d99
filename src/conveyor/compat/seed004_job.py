"""Seed 004's job classes: ``JobBase`` (the seed's ``QueueJobBase``) and how one runs in a child.

A job class subclasses :class:`JobBase` and implements a synchronous ``run()``. It reads its
parameters from ``self.params`` (the seed's ``self.mcp_params``) and reports through
``set_progress``, ``set_description``, ``set_status``, ``set_result`` and ``set_error``.

How a class runs without anything being imported on a payload's say-so: the manager registers
each job class as a conveyor task on the process executor (:func:`process_entry`). The task's
callable is a small entry object whose module and qualified name are those of the class's
:meth:`JobBase.run_job` (``mymodule.MyJob.run_job``), so the process child, which resolves the
callable from the module and qualified name the *parent* took from its registry, imports the
class's module and calls ``MyJob.run_job(ctx, params)``. That builds the instance
(``MyJob(job_id, params)``, so classes may override ``__init__`` as with the seed's base class),
wires it to the job context, calls ``run()`` and turns what the job reported into the outcome.

This module is imported by every process child that runs a job class, so it imports little.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from conveyor.context import JobContext

__all__ = [
    "MAX_DESCRIPTION_CHARS",
    "SETTABLE_STATUSES",
    "JobBase",
    "JobReportedError",
    "QueueJobBase",
    "process_entry",
]

#: The longest description kept (the brokers cut longer ones to this too).
MAX_DESCRIPTION_CHARS: Final = 1024
#: What ``set_status`` accepts: the seed's vocabulary minus ``deleted`` (no job deletes itself).
SETTABLE_STATUSES: Final = frozenset({"pending", "running", "completed", "failed", "stopped"})
#: Statuses that make the job end failed when ``run()`` returns (see :meth:`JobBase.run_job`).
_FAILING_STATUSES: Final = frozenset({"failed", "stopped"})
#: How the job's logger formats records: the format conveyor's log capture uses.
_LOG_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"


class JobReportedError(Exception):
    """The job reported a failure (``set_error``, or ``set_status("failed")``); never retried."""


class _StderrHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is at emit time.

    In a process child that is conveyor's line capture, so each line of a record (a traceback
    too) lands in the job's log as a ``[stderr]`` line, as it would on a console.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(_LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _console_logger(name: str) -> logging.Logger:
    """The job's logger, writing to stderr instead of propagating (once per process)."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        # Not propagated: the root logger's capture handler would add every record a second
        # time, as a plain (stdout-looking) line.
        logger.propagate = False
    return logger


class JobBase:
    """Base class of seed-004 job classes (the seed's ``QueueJobBase``): implement ``run()``.

    ``run()`` is synchronous and runs in a spawned process child. What it prints goes to the
    job's stdout log, what it writes to ``sys.stderr`` or logs through :attr:`logger` to its
    stderr log. Constructed outside a job (in a unit test, say) the setters only record values
    on the instance, so ``MyJob("id", {...}).run()`` works anywhere.

    Class attributes:
        job_type: the type ``per_job_type_limits`` counts this class under (default: the class
            name).
        timeout_s: a run longer than this is stopped and fails (default: the manager's
            ``job_timeout_s``, by default no limit).

    Args:
        job_id: the job's id.
        params: the job's parameters (a JSON-compatible dict).
    """

    job_type: ClassVar[str | None] = None
    timeout_s: ClassVar[float | None] = None

    def __init__(self, job_id: str, params: Mapping[str, Any] | None = None) -> None:
        self.job_id = job_id
        self.params: dict[str, Any] = dict(params or {})
        #: The last status the job reported (``running`` once conveyor runs it).
        self.status = "pending"
        self.progress = 0
        self.description = ""
        self.result: Any = None
        self.error: str | None = None
        self._result_set = False
        self._ctx: JobContext | None = None
        self._logger: logging.Logger | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.job_id} {self.status} {self.progress}%>"

    # -- what a job implements -------------------------------------------------------------------

    def run(self) -> Any:
        """Do the work (override this).

        Report with the setters; a return value is the result unless :meth:`set_result` was
        called.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement run()")

    # -- what a job uses -------------------------------------------------------------------------

    @property
    def mcp_params(self) -> dict[str, Any]:
        """The seed's name for :attr:`params`."""
        return self.params

    @property
    def logger(self) -> logging.Logger:
        """The job's logger (named after its class); in a job its records go to stderr."""
        if self._logger is None:
            self._logger = logging.getLogger(type(self).type_logger_name())
        return self._logger

    @classmethod
    def type_name(cls) -> str:
        """The job type ``per_job_type_limits`` counts this class under."""
        return cls.job_type or cls.__name__

    @classmethod
    def type_logger_name(cls) -> str:
        """The name of the class's logger: ``module.QualifiedName``."""
        return f"{cls.__module__}.{cls.__qualname__}"

    def set_progress(self, progress: int | float) -> None:
        """Report progress in percent, clamped to 0-100."""
        value = max(0, min(100, int(progress)))
        if value == self.progress:
            return  # a loop reporting every item need not send the same value again
        self.progress = value
        if self._ctx is not None:
            self._ctx.progress(value)

    def set_description(self, description: str) -> None:
        """Report a human-readable description of the current step (cut to 1024 chars)."""
        text = str(description)[:MAX_DESCRIPTION_CHARS]
        if text == self.description:
            return
        self.description = text
        if self._ctx is not None:
            self._ctx.progress(None, text)

    def set_status(self, status: str) -> None:
        """Report a status: ``pending``, ``running``, ``completed``, ``failed`` or ``stopped``.

        It cannot move the job's state while it runs (the job is ``running`` until ``run()``
        returns); it decides the outcome then: a last status of ``failed`` or ``stopped`` ends
        the job failed, any other completed. It is logged at DEBUG on :attr:`logger`.
        """
        if status not in SETTABLE_STATUSES:
            raise ValueError(
                f"unknown job status {status!r}; use one of {', '.join(sorted(SETTABLE_STATUSES))}"
            )
        self.status = status
        self.logger.debug("status %s", status)

    def set_result(self, result: Any) -> None:
        """Set the job's result (JSON-compatible) and its status to ``completed``."""
        self.result = result
        self._result_set = True
        self.error = None
        self.set_status("completed")

    def set_error(self, message: str, status: str = "failed") -> None:
        """Report a failure: the job ends failed with ``message`` as its error and description.

        ``status`` is recorded (``failed``, or ``stopped``); either way conveyor stores the job
        as failed, since only a stop from outside (``stop_job``) makes a job stopped.
        """
        self.error = str(message)
        self.set_description(self.error)
        self.set_status(status)

    def set_mcp_result(self, result: Any) -> None:
        """The seed's name for :meth:`set_result`."""
        self.set_result(result)

    def set_mcp_error(self, message: str, status: str = "failed") -> None:
        """The seed's name for :meth:`set_error`."""
        self.set_error(message, status)

    # -- how conveyor runs it --------------------------------------------------------------------

    @classmethod
    def run_job(cls, ctx: JobContext, params: dict[str, Any]) -> Any:
        """Run one job of this class in the current process (the process child calls this).

        Builds the instance, wires its setters to ``ctx``, calls ``run()`` and returns the
        result. The outcome: an exception from ``run()`` fails the job (its traceback is
        logged to stderr first, as the seed did); a last status of ``failed``/``stopped``
        (``set_error`` sets one) fails it with :class:`JobReportedError`, which is never
        retried; otherwise it completes with the result of ``set_result``, else ``run()``'s
        return value, and its progress is set to 100.
        """
        job = cls(ctx.job_id, params)
        job._ctx = ctx
        job._logger = _console_logger(cls.type_logger_name())
        job.status = "running"
        try:
            returned = job.run()
        except Exception:
            job.logger.exception("job %s (%s) raised", ctx.job_id, cls.__qualname__)
            raise
        if job.status in _FAILING_STATUSES:
            raise JobReportedError(
                job.error or job.description or f"the job set its status to {job.status}"
            )
        job.set_progress(100)
        return job.result if job._result_set else returned


#: The seed's name for :class:`JobBase`.
QueueJobBase = JobBase


class _ProcessEntry:
    """The registered callable of a job class: the class's ``run_job`` under a resolvable name.

    The process executor sends the child this object's ``__module__`` and ``__qualname__``
    (``mymodule.MyJob`` and ``MyJob.run_job``), which the child resolves to the classmethod
    bound to ``MyJob``. Its signature, ``(ctx, params)``, tells conveyor to pass the context.
    Calling it here runs the job in this process (``task.run_inline``, tests).
    """

    def __init__(self, job_class: type[JobBase]) -> None:
        self.job_class = job_class
        self.__module__ = job_class.__module__
        self.__qualname__ = f"{job_class.__qualname__}.run_job"
        self.__doc__ = job_class.__doc__

    def __call__(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        return self.job_class.run_job(ctx, params)

    def __repr__(self) -> str:
        return f"<job class {self.__module__}.{self.job_class.__qualname__}>"


def process_entry(job_class: type[JobBase]) -> _ProcessEntry:
    """The callable to register as ``job_class``'s task (see :class:`_ProcessEntry`)."""
    return _ProcessEntry(job_class)
