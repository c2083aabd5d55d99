"""Seed 004's read side: job statuses in the seed's vocabulary, its stdout/stderr log split.

conveyor's states map onto the seed's six statuses like this (``state`` on a
:class:`JobStatus` keeps conveyor's own):

==============================  ===========
conveyor state                  seed status
==============================  ===========
pending (added, not started)    pending
queued (started, waiting for    pending
a free process slot)
scheduled (waiting for a retry  pending
backoff; only with retries)
running                         running
completed                       completed
failed (dead letters)           failed
stopped (cancelled)             stopped
(deleted by this manager)       deleted
==============================  ===========
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final

from conveyor.brokers.base import LogPage
from conveyor.compat.seed004_job import JobReportedError
from conveyor.job import Job, JobState

__all__ = [
    "SEED_STATUSES",
    "STATES_OF_STATUS",
    "STATUS_OF_STATE",
    "JobStatus",
    "QueueJobResult",
    "split_logs",
]

#: The seed's status vocabulary.
SEED_STATUSES: Final = ("pending", "running", "completed", "failed", "stopped", "deleted")

#: conveyor state -> seed status.
STATUS_OF_STATE: Final[Mapping[JobState, str]] = {
    JobState.PENDING: "pending",
    JobState.QUEUED: "pending",
    JobState.SCHEDULED: "pending",
    JobState.RUNNING: "running",
    JobState.COMPLETED: "completed",
    JobState.FAILED: "failed",
    JobState.STOPPED: "stopped",
}

#: seed status -> the conveyor states it covers (``deleted`` covers none: the record is gone).
STATES_OF_STATUS: Final[Mapping[str, frozenset[JobState]]] = {
    status: frozenset(s for s, name in STATUS_OF_STATE.items() if name == status)
    for status in SEED_STATUSES
}

# The error the worker stores for a set_error() is "<qualified class name>: <message>"; the seed
# reports the message alone.
_REPORTED_PREFIX: Final = f"{JobReportedError.__module__}.{JobReportedError.__qualname__}: "

#: A record from conveyor's log capture: "LEVEL logger.name: message" (see worker/capture.py).
_CAPTURED_RECORD: Final = re.compile(r"(?:CRITICAL|ERROR|WARNING|INFO|DEBUG) \S+: ")
_STDERR_PREFIX: Final = "[stderr] "


class JobStatus(Mapping[str, Any]):
    """A job's status in the seed's shape (the seed's ``QueueJobResult``).

    Read it as attributes (``status.status``, ``status.result``) or as a mapping
    (``status["status"]``, ``dict(status)``) with the seed's keys: ``job_id``, ``status``,
    ``result``, ``error``, ``progress``, ``description``. Compares equal to a dict of those.

    Attributes beyond the mapping:
        job: conveyor's job record (None for a deleted job).
        state: conveyor's state (None for a deleted job).
    """

    KEYS: Final = ("job_id", "status", "result", "error", "progress", "description")

    __slots__ = ("description", "error", "job", "job_id", "progress", "result", "status")

    def __init__(
        self,
        job_id: str,
        status: str,
        *,
        result: Any = None,
        error: str | None = None,
        progress: int = 0,
        description: str = "",
        job: Job | None = None,
    ) -> None:
        self.job_id = job_id
        self.status = status
        self.result = result
        self.error = error
        self.progress = progress
        self.description = description
        self.job = job

    @classmethod
    def from_job(cls, job: Job) -> JobStatus:
        """The status of a stored job."""
        error = job.error
        if error is not None and error.startswith(_REPORTED_PREFIX):
            error = error[len(_REPORTED_PREFIX) :]
        return cls(
            job.id,
            STATUS_OF_STATE[job.state],
            result=job.result,
            error=error,
            progress=job.progress,
            description=job.description,
            job=job,
        )

    @classmethod
    def deleted(cls, job_id: str) -> JobStatus:
        """The status of a job this manager deleted (or evicted to honour a limit)."""
        return cls(job_id, "deleted")

    @property
    def state(self) -> JobState | None:
        """The job's state in conveyor's terms (None once deleted)."""
        return self.job.state if self.job is not None else None

    def __getitem__(self, key: str) -> Any:
        if key not in self.KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)

    def __repr__(self) -> str:
        return f"JobStatus({dict(self)!r})"

    def to_dict(self) -> dict[str, Any]:
        """The seed's dict: ``{"job_id", "status", "result", "error", "progress", ...}``."""
        return dict(self)


#: The seed's name for :class:`JobStatus`.
QueueJobResult = JobStatus


def split_logs(job_id: str, page: LogPage) -> dict[str, Any]:
    """The seed's ``get_job_logs`` dict from a job's captured log.

    ``stderr`` gets the lines the process child captured from ``sys.stderr`` (stored with a
    ``[stderr]`` prefix, removed here) and logging records (``LEVEL logger: message``, as
    conveyor's capture and the job's logger write them); ``stdout`` gets everything else:
    printed lines and ``ctx.log`` lines. A stored entry spanning several lines (a captured
    record with a traceback) counts as that many lines of its stream. ``dropped_lines`` (not
    in the seed) counts old lines dropped by the broker's per-job cap.
    """
    stdout: list[str] = []
    stderr: list[str] = []
    for entry in page.lines:
        if entry.startswith(_STDERR_PREFIX):
            stderr.extend(entry[len(_STDERR_PREFIX) :].split("\n"))
        elif _CAPTURED_RECORD.match(entry):
            stderr.extend(entry.split("\n"))
        else:
            stdout.extend(entry.split("\n"))
    return {
        "job_id": job_id,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_lines": len(stdout),
        "stderr_lines": len(stderr),
        "dropped_lines": page.dropped,
    }
