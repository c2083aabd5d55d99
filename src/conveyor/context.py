"""The job context a task may take as first parameter: identity, progress, logs, cancellation."""

from __future__ import annotations

import contextvars
import threading
from typing import Any, Protocol

from conveyor.job import Job

#: Guards the lazy creation of JobContext events against a concurrent cancel().
_EVENT_LOCK = threading.Lock()


class Reporter(Protocol):
    """Where a context sends progress and log lines; thread-safe and non-blocking.

    The worker implements it (buffering and coalescing writes to the broker); a process child
    implements it by writing to the pipe to its parent.
    """

    def report_progress(self, job: Job, progress: int | None, description: str | None) -> None:
        """Record progress (0-100) and/or a description for ``job``."""
        ...

    def report_log(self, job: Job, line: str) -> None:
        """Record one log line for ``job``."""
        ...


class JobContext:
    """What a running job knows about itself. Take it as the task's first parameter (``ctx``).

    Every method is safe to call from the event loop, a worker thread or a process child, and
    never blocks: updates are buffered and written to the broker by the worker.
    """

    __slots__ = ("_cancelled", "_event", "_reporter", "job")

    def __init__(self, job: Job, reporter: Reporter) -> None:
        self.job = job
        self._reporter = reporter
        self._cancelled = False
        # Created on the first wait_cancelled() only: most jobs never wait, and one Event (a
        # Condition and a lock) per job is a measurable share of a no-op job's cost.
        self._event: threading.Event | None = None

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.job.id

    @property
    def attempt(self) -> int:
        """Which run this is: 1 for the first, 2 for the first retry, ..."""
        return self.job.attempts + 1

    @property
    def queue(self) -> str:
        """The job's queue."""
        return self.job.queue

    @property
    def task(self) -> str:
        """The task name."""
        return self.job.task

    @property
    def cancelled(self) -> bool:
        """True once the job was cancelled or timed out; long sync loops should check it."""
        return self._cancelled

    def cancel(self) -> None:
        """Mark the job cancelled (done by the worker; tasks read :attr:`cancelled`)."""
        self._cancelled = True  # first: an event created from now on starts set
        with _EVENT_LOCK:
            event = self._event
        if event is not None:
            event.set()

    def wait_cancelled(self, timeout_s: float | None = None) -> bool:
        """Block (in a thread job) until cancelled or ``timeout_s``; True if cancelled."""
        event = self._event
        if event is None:
            with _EVENT_LOCK:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
                    if self._cancelled:
                        event.set()
        return event.wait(timeout_s)

    def progress(self, percent: int | float | None = None, description: str | None = None) -> None:
        """Report progress (clamped to 0-100) and/or a human-readable description."""
        pct = None if percent is None else max(0, min(100, int(percent)))
        self._reporter.report_progress(self.job, pct, description)

    def log(self, *parts: Any) -> None:
        """Append a line to the job's log (parts are joined with spaces, like print)."""
        self._reporter.report_log(self.job, " ".join(str(p) for p in parts))


#: The context of the job running in this task or thread (for log capture and helpers).
current_context: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "conveyor_job_context", default=None
)
