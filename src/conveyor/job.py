"""The job record, its states and priorities, and the one transition table every broker enforces."""

from __future__ import annotations

import enum
import re
import uuid
from typing import Any, Final

import msgspec

from conveyor.errors import InvalidJobError


class JobState(enum.StrEnum):
    """Where a job is in its life.

    ``pending`` is held until started (seed 004's add-then-start), ``scheduled`` waits for its
    ``run_at_ms`` (a delay or a retry backoff), ``failed`` is the dead-letter state and ``stopped``
    means cancelled. Deletion removes the record and has no state.
    """

    PENDING = "pending"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_finished(self) -> bool:
        """True for the terminal states (completed, failed, stopped)."""
        return self in FINISHED_STATES

    @property
    def is_live(self) -> bool:
        """True while the job may still run (pending, queued, scheduled, running)."""
        return self not in FINISHED_STATES


FINISHED_STATES: Final = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.STOPPED})
LIVE_STATES: Final = frozenset(JobState) - FINISHED_STATES


class Priority(enum.StrEnum):
    """Job priority: high jobs are reserved before normal ones, normal before low."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low: the order in which they are reserved."""
        return _PRIORITY_RANK[self]

    @classmethod
    def parse(cls, value: str | Priority) -> Priority:
        """Parse a priority, raising :class:`InvalidJobError` with the accepted values."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidJobError(
                f"invalid priority {value!r}; use one of: high, normal, low"
            ) from None


_PRIORITY_RANK: Final = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


class Transition(enum.StrEnum):
    """Broker transitions; the same names are used by Python methods, Lua files, SQL and logs."""

    ENQUEUE = "enqueue"
    START = "start"
    RESERVE = "reserve"
    EXTEND_LEASE = "extend_lease"
    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    RELEASE = "release"
    REQUEUE_EXPIRED = "requeue_expired"
    PROMOTE_SCHEDULED = "promote_scheduled"
    CANCEL = "cancel"
    REDRIVE = "redrive"


_S = JobState
#: transition -> (states it may start from, states it may lead to); a ``None`` source is "new".
TRANSITIONS: Final[dict[Transition, tuple[frozenset[JobState | None], frozenset[JobState]]]] = {
    Transition.ENQUEUE: (frozenset({None}), frozenset({_S.PENDING, _S.QUEUED, _S.SCHEDULED})),
    Transition.START: (frozenset({_S.PENDING}), frozenset({_S.QUEUED, _S.SCHEDULED})),
    Transition.RESERVE: (frozenset({_S.QUEUED}), frozenset({_S.RUNNING})),
    Transition.EXTEND_LEASE: (frozenset({_S.RUNNING}), frozenset({_S.RUNNING})),
    Transition.ACK: (frozenset({_S.RUNNING}), frozenset({_S.COMPLETED})),
    Transition.RETRY: (frozenset({_S.RUNNING}), frozenset({_S.SCHEDULED, _S.QUEUED})),
    Transition.DEAD_LETTER: (frozenset({_S.RUNNING}), frozenset({_S.FAILED})),
    Transition.RELEASE: (frozenset({_S.RUNNING}), frozenset({_S.QUEUED})),
    Transition.REQUEUE_EXPIRED: (frozenset({_S.RUNNING}), frozenset({_S.QUEUED, _S.FAILED})),
    Transition.PROMOTE_SCHEDULED: (frozenset({_S.SCHEDULED}), frozenset({_S.QUEUED})),
    Transition.CANCEL: (
        frozenset({_S.PENDING, _S.QUEUED, _S.SCHEDULED, _S.RUNNING}),
        frozenset({_S.STOPPED}),
    ),
    Transition.REDRIVE: (frozenset({_S.FAILED, _S.STOPPED}), frozenset({_S.QUEUED})),
}


def can_transition(transition: Transition, source: JobState | None, target: JobState) -> bool:
    """Whether ``transition`` may move a job from ``source`` to ``target``."""
    sources, targets = TRANSITIONS[transition]
    return source in sources and target in targets


def allowed_from(transition: Transition) -> frozenset[JobState | None]:
    """The states a job may be in for ``transition`` to apply."""
    return TRANSITIONS[transition][0]


QUEUE_NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TASK_NAME_PATTERN: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,254}$")


def validate_queue_name(name: str) -> str:
    """Return ``name`` if it is a valid queue name, else raise :class:`InvalidJobError`.

    Queue names appear inside Redis hash tags and SQL values, so they are restricted to
    1-128 characters of letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit.
    """
    if not isinstance(name, str) or not QUEUE_NAME_PATTERN.fullmatch(name):
        raise InvalidJobError(
            f"invalid queue name {name!r}; use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise :class:`InvalidJobError`."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name):
        raise InvalidJobError(
            f"invalid task name {name!r}; use a Python-style dotted name such as 'app.tasks.send'"
        )
    return name


def new_job_id() -> str:
    """A new random job id (32 hex characters)."""
    return uuid.uuid4().hex


class RetrySpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """The stored form of a retry policy (see :mod:`conveyor.retry` for the behaviour).

    ``kind`` is ``fixed``, ``exponential`` or ``custom``; ``delays_s`` is used by ``custom`` and
    ``delay_s`` by ``fixed``. ``deadline_s`` bounds the total time spent retrying.
    """

    kind: str = "exponential"
    delay_s: float = 1.0
    base: float = 2.0
    min_delay_s: float = 1.0
    max_delay_s: float = 60.0
    delays_s: tuple[float, ...] = ()
    jitter: float = 0.1
    deadline_s: float | None = None
    retry_on: tuple[str, ...] = ()
    give_up_on: tuple[str, ...] = ()


class Job(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One requested run of a task, as stored by every broker.

    Timestamps are integer epoch milliseconds. ``attempts`` counts runs that were charged
    (a failure, a retry, or an expired lease); a graceful ``release`` charges nothing.
    ``lost_leases`` counts expired leases only, so a job that keeps killing its worker can be
    dead-lettered as poison after ``max_lost_leases`` of them.
    """

    id: str
    task: str
    queue: str = "default"
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    state: JobState = JobState.QUEUED
    attempts: int = 0
    max_attempts: int = 3
    lost_leases: int = 0
    max_lost_leases: int = 3
    enqueued_ms: int = 0
    run_at_ms: int = 0
    started_ms: int | None = None
    finished_ms: int | None = None
    progress: int = 0
    description: str = ""
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    failure_reason: str | None = None
    dedup_key: str | None = None
    timeout_s: float | None = None
    retry: RetrySpec | None = None
    on_success: str | None = None
    on_failure: str | None = None
    lease_token: str | None = None
    lease_expires_ms: int | None = None
    worker_id: str | None = None

    @property
    def lease(self) -> Lease:
        """The lease this job was reserved under; raises if the job holds none."""
        if self.lease_token is None:
            raise InvalidJobError(f"job {self.id} holds no lease; only reserved jobs do")
        return Lease(job_id=self.id, queue=self.queue, token=self.lease_token)


class Lease(msgspec.Struct, frozen=True):
    """A worker's claim on a running job: presented to ack, retry, dead_letter and release."""

    job_id: str
    queue: str
    token: str


class FailureReason(enum.StrEnum):
    """Why a job ended in dead letters (stored in ``Job.failure_reason``)."""

    EXHAUSTED = "exhausted"  # ran out of attempts (or its retry deadline)
    GAVE_UP = "gave_up"  # the retry policy gave up on this exception class
    POISON = "poison"  # its worker died under it too many times
    SYSTEM_ERROR = "system_error"  # could not even start: undecodable, unknown task, bad arguments
    TIMEOUT = "timeout"  # timed out on its last attempt
