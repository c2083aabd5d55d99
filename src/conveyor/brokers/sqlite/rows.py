"""Conversion between SQLite rows and conveyor records (Job, JobEvent), lean for the hot path."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from conveyor.brokers.base import EventKind, JobEvent
from conveyor.codec import Codec
from conveyor.job import Job, JobState, Priority, RetrySpec

#: ``Priority.rank`` -> Priority, for decoding the integer column.
PRIORITY_BY_RANK: Final = tuple(sorted(Priority, key=lambda p: p.rank))
_STATES: Final = {state.value: state for state in JobState}
_KINDS: Final = {kind.value: kind for kind in EventKind}


class JobOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """The rarely-set, never-queried job fields, stored together as JSON in ``jobs.options``."""

    timeout_s: float | None = None
    retry: RetrySpec | None = None
    on_success: str | None = None
    on_failure: str | None = None


_NO_OPTIONS: Final = JobOptions()
_options_encoder: Final = msgspec.json.Encoder()
_options_decoder: Final = msgspec.json.Decoder(JobOptions)


def enqueue_params(job: Job, codec: Codec) -> tuple[Any, ...]:
    """The positional parameters of the ``enqueue`` query for a prepared job."""
    options = JobOptions(
        timeout_s=job.timeout_s,
        retry=job.retry,
        on_success=job.on_success,
        on_failure=job.on_failure,
    )
    return (
        job.id,
        job.queue,
        job.task,
        codec.encode([job.args, job.kwargs]),
        None if options == _NO_OPTIONS else _options_encoder.encode(options).decode(),
        job.state.value,
        Priority.parse(job.priority).rank,
        job.max_attempts,
        job.max_lost_leases,
        job.enqueued_ms,
        job.run_at_ms,
        job.dedup_key,
    )


def job_from_row(row: tuple[Any, ...], codec: Codec) -> Job:
    """Decode a job row (the 26 columns listed at the top of ``queries.sql``)."""
    (
        _seq,
        job_id,
        task,
        queue,
        payload,
        options,
        state,
        priority,
        attempts,
        max_attempts,
        lost_leases,
        max_lost_leases,
        enqueued_ms,
        run_at_ms,
        started_ms,
        finished_ms,
        progress,
        description,
        result,
        error,
        traceback,
        failure_reason,
        dedup_key,
        lease_token,
        lease_expires_ms,
        worker_id,
    ) = row
    args, kwargs = codec.decode_payload(payload)
    opts = _options_decoder.decode(options) if options is not None else _NO_OPTIONS
    return Job(
        id=job_id,
        task=task,
        queue=queue,
        args=args,
        kwargs=kwargs,
        priority=PRIORITY_BY_RANK[priority],
        state=_STATES[state],
        attempts=attempts,
        max_attempts=max_attempts,
        lost_leases=lost_leases,
        max_lost_leases=max_lost_leases,
        enqueued_ms=enqueued_ms,
        run_at_ms=run_at_ms,
        started_ms=started_ms,
        finished_ms=finished_ms,
        progress=progress,
        description=description,
        result=None if result is None else codec.decode(result),
        error=error,
        traceback=traceback,
        failure_reason=failure_reason,
        dedup_key=dedup_key,
        timeout_s=opts.timeout_s,
        retry=opts.retry,
        on_success=opts.on_success,
        on_failure=opts.on_failure,
        lease_token=lease_token,
        lease_expires_ms=lease_expires_ms,
        worker_id=worker_id,
    )


def event_from_row(row: tuple[Any, ...]) -> JobEvent:
    """Decode an ``events`` row (the columns of the ``events_after`` query)."""
    (
        event_id,
        kind,
        job_id,
        queue,
        ts_ms,
        state,
        transition,
        task,
        attempts,
        progress,
        description,
        line,
        error,
    ) = row
    return JobEvent(
        id=str(event_id),
        kind=_KINDS[kind],
        job_id=job_id,
        queue=queue,
        ts_ms=ts_ms,
        state=None if state is None else _STATES[state],
        transition=transition,
        task=task,
        attempts=attempts,
        progress=progress,
        description=description,
        line=line,
        error=error,
    )
