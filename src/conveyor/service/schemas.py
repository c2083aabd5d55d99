"""Pydantic models of the HTTP boundary: operation parameters, results and the error body.

Validation models live only here (the engine uses msgspec structs). Parameter models forbid
unknown fields, so a typo (``stat=failed``, ``{"prority": ...}``) is a 422 / -32602 naming the
field instead of a silently ignored option. Names and limits mirror the broker contract.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from conveyor.job import QUEUE_NAME_PATTERN, TASK_NAME_PATTERN, Job, JobState, Priority

# The patterns come from conveyor.job (the one definition of a valid name), so the OpenAPI
# document states exactly what the broker accepts.
QueueName = Annotated[
    str,
    Field(
        pattern=QUEUE_NAME_PATTERN.pattern,
        max_length=128,
        description="1-128 letters, digits, '_', '.' or '-', starting with a letter or digit.",
        examples=["default"],
    ),
]
TaskName = Annotated[
    str,
    Field(
        pattern=TASK_NAME_PATTERN.pattern,
        max_length=255,
        description="A registered task's name, e.g. 'app.tasks.send'.",
        examples=["app.tasks.send"],
    ),
]
#: A job id as the API accepts it: any id the broker stores (at most 128 characters).
JobId = Annotated[str, Field(min_length=1, max_length=128, description="A job's id.")]
#: Ids a client may choose for a new job: safe in a URL path segment.
NewJobId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
        description="Your own id for the new job (letters, digits, '_', '.', ':', '-').",
    ),
]
Cursor = Annotated[str, Field(min_length=1, max_length=256, description="next_cursor of a page.")]
PageLimit = Annotated[int, Field(ge=1, le=1000, description="Jobs per page (1-1000).")]

MAX_DELAY_S = 366 * 86_400
MAX_TIMEOUT_S = 30 * 86_400
MAX_BATCH = 1000


class Params(BaseModel):
    """Base of every parameter model: unknown fields are errors, floats must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Empty(Params):
    """No parameters."""


# -- jobs ------------------------------------------------------------------------------------------


class JobSpec(Params):
    """One job to enqueue. ``start=false`` holds it as ``pending`` until it is started."""

    task: TaskName
    args: list[Any] = Field(default_factory=list, description="Positional arguments (JSON).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments (JSON).")
    queue: QueueName | None = Field(
        default=None, description="Queue (default: the task's, or 'default')."
    )
    priority: Priority | None = Field(default=None, description="high, normal or low.")
    delay_s: float | None = Field(
        default=None, ge=0, le=MAX_DELAY_S, description="Run after this delay."
    )
    dedup_key: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="While a job with this key is live in the queue, return its id instead.",
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=1000, description="Runs before dead letters."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, description="Per-run timeout."
    )
    job_id: NewJobId | None = None
    start: bool = Field(default=True, description="False: add as pending; start it with .../start.")


class HeldJobSpec(JobSpec):
    """A job for ``queue_add_job``: held as ``pending`` unless ``start`` is true (seed 004).

    Seed 004's ``add_job`` adds without starting and ``start_job`` starts; REST's ``POST /jobs``
    defaults to starting at once. Same fields, same handler; only this default differs.
    """

    start: bool = Field(default=False, description="True: queue it at once instead of holding it.")


class JobBatch(Params):
    """Several jobs, enqueued all or nothing (each is validated before any is written)."""

    jobs: list[JobSpec] = Field(min_length=1, max_length=MAX_BATCH)


class JobRef(Params):
    """Names one job."""

    job_id: JobId


class LogsQuery(Params):
    """Which of a job's kept log lines to return."""

    offset: int = Field(default=0, ge=0, le=1_000_000_000, description="0 = the oldest kept line.")
    limit: int | None = Field(default=None, ge=1, le=10_000, description="At most this many lines.")


class LogsParams(LogsQuery):
    """A job's log lines."""

    job_id: JobId


class ListQuery(Params):
    """Filters and paging of ``GET /jobs``."""

    queue: QueueName | None = None
    state: list[JobState] | None = Field(default=None, description="One or more states.")
    task: TaskName | None = None
    limit: PageLimit = 100
    cursor: Cursor | None = None


class DeadLetterQuery(Params):
    """Filters and paging of the dead letters (failed jobs)."""

    queue: QueueName | None = None
    task: TaskName | None = None
    limit: PageLimit = 100
    cursor: Cursor | None = None


class CountsQuery(Params):
    """Counts of one queue, or of all."""

    queue: QueueName | None = None


class PurgeQuery(Params):
    """Which states to purge (default: pending, queued, scheduled; running is refused)."""

    state: list[JobState] | None = None


class PurgeParams(PurgeQuery):
    """Purge a queue."""

    queue: QueueName


class RedriveParams(Params):
    """Dead letters back to work: every failed job of ``queue``, or the listed ids."""

    queue: QueueName | None = Field(
        default=None, description="Default: every queue (or the jobs' own)."
    )
    job_ids: list[JobId] | None = Field(default=None, min_length=1, max_length=MAX_BATCH)


class HealthQuery(Params):
    """Health options."""

    counts: bool = Field(default=False, description="Also count jobs per state (one broker read).")


# -- results ---------------------------------------------------------------------------------------


class Result(BaseModel):
    """Base of every result model."""

    model_config = ConfigDict(extra="ignore")


class JobOut(Result):
    """A job record as the API shows it (the lease token is never shown)."""

    id: str
    task: str
    queue: str
    state: JobState
    priority: Priority = Priority.NORMAL
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
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
    on_success: str | None = None
    on_failure: str | None = None
    lease_expires_ms: int | None = None
    worker_id: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """The API view of a stored job."""
        # Every field, defaults included: the stored form omits defaults, the API never does.
        fields = {name: getattr(job, name) for name in job.__struct_fields__}
        return cls.model_validate(msgspec.to_builtins(fields))


class Enqueued(Result):
    """The id of the enqueued job (the live job's id if ``dedup_key`` matched one)."""

    job_id: str


class EnqueuedBatch(Result):
    """The ids of the enqueued jobs, in request order."""

    job_ids: list[str]


class Deleted(Result):
    """A job was deleted."""

    job_id: str
    deleted: Literal[True] = True


class LogsOut(Result):
    """A job's kept log lines (oldest first) and how many older ones the cap dropped."""

    job_id: str
    lines: list[str]
    offset: int
    total: int
    dropped: int


class JobPageOut(Result):
    """One page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    jobs: list[JobOut]
    next_cursor: str | None


class CountsOut(Result):
    """Jobs per state, per queue (every state present), and the sum over queues."""

    queues: dict[str, dict[JobState, int]]
    totals: dict[JobState, int]


class Purged(Result):
    """How many jobs a purge deleted."""

    queue: str
    deleted: int


class Redriven(Result):
    """How many dead letters went back to work."""

    redriven: int
    queues: list[str]


class BrokerHealth(Result):
    """Whether the broker answered a ping, and how fast."""

    reachable: bool
    kind: str
    latency_ms: float | None = None
    error: str | None = None
    circuit: Literal["closed", "open"] = "closed"


class EventsHealth(Result):
    """The shared event subscription and its clients."""

    running: bool
    clients: int
    direct_clients: int
    dropped_clients: int
    last_event_id: str | None = None
    error: str | None = None


class HealthOut(Result):
    """The health report.

    ``status`` is ``ok`` (all good), ``degraded`` (serving, with a problem named in
    ``problems``) or ``unavailable`` (the broker is unreachable or a worker stopped consuming:
    HTTP 503).
    """

    status: Literal["ok", "degraded", "unavailable"]
    problems: list[str]
    version: str
    uptime_s: float
    loop_lag_ms: float
    broker: BrokerHealth
    events: EventsHealth
    workers: list[dict[str, Any]]
    counts: dict[JobState, int] | None = None


# -- errors ----------------------------------------------------------------------------------------


class FieldError(Result):
    """One invalid field: where (``loc``), what is wrong (``msg``) and the check (``type``)."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorDetail(Result):
    """What went wrong and what to do: ``code`` is stable, ``message`` is for people."""

    code: str
    message: str
    type: str
    fields: list[FieldError] | None = None


class ErrorBody(Result):
    """Every error response of the REST API."""

    error: ErrorDetail
