"""Seed 004's queue limits: before an add, evict the oldest unfinished jobs (or refuse the add).

``max_queue_size`` bounds a manager's unfinished jobs (pending, queued, scheduled, running) and
``per_job_type_limits`` those of one job type. At a limit the ``evict`` policy (the seed's)
deletes the oldest unfinished jobs, by enqueue order, running ones included; ``reject`` raises
:class:`~conveyor.errors.QueueLimitReached` and changes nothing. The caller serialises adds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Literal

from conveyor.client import Conveyor
from conveyor.errors import ConfigurationError, JobNotFound, QueueLimitReached
from conveyor.job import LIVE_STATES, Job, JobState

__all__ = ["LimitPolicy", "QueueLimits", "all_jobs", "check_count"]

logger = logging.getLogger(__name__)

LimitPolicy = Literal["evict", "reject"]

#: Jobs per page when listing (the brokers' maximum).
_PAGE: Final = 1000


def check_count(name: str, value: object) -> None:
    """Raise ConfigurationError unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")


async def all_jobs(
    app: Conveyor, queue: str, states: Iterable[JobState] | None = None, task: str | None = None
) -> list[Job]:
    """Every job of ``queue`` in ``states`` (of ``task``), newest first, read page by page."""
    wanted = None if states is None else list(states)
    jobs: list[Job] = []
    cursor: str | None = None
    while True:
        page = await app.list_jobs(
            queue=queue, states=wanted, task=task, limit=_PAGE, cursor=cursor
        )
        jobs.extend(page.jobs)
        if page.next_cursor is None:
            return jobs
        cursor = page.next_cursor


class QueueLimits:
    """A manager's limits and what to do at them.

    Args:
        max_queue_size: most unfinished jobs in the queue (None: no limit).
        per_job_type_limits: most unfinished jobs per job type.
        policy: ``evict`` the oldest unfinished jobs, or ``reject`` the add.
    """

    def __init__(
        self,
        max_queue_size: int | None = None,
        per_job_type_limits: Mapping[str, int] | None = None,
        policy: LimitPolicy = "evict",
    ) -> None:
        if max_queue_size is not None:
            check_count("max_queue_size", max_queue_size)
        for job_type, limit in (per_job_type_limits or {}).items():
            check_count(f"per_job_type_limits[{job_type!r}]", limit)
        if policy not in ("evict", "reject"):
            raise ConfigurationError(f"limit_policy must be 'evict' or 'reject', not {policy!r}")
        self.max_queue_size = max_queue_size
        self.per_job_type = dict(per_job_type_limits or {})
        self.policy: LimitPolicy = policy

    def __repr__(self) -> str:
        return (
            f"<QueueLimits max_queue_size={self.max_queue_size} "
            f"per_job_type={self.per_job_type} policy={self.policy}>"
        )

    async def make_room(
        self,
        app: Conveyor,
        queue: str,
        job_type: str,
        task_names: Iterable[str],
        evicted: Callable[[str], None],
    ) -> None:
        """Make one more unfinished job of ``job_type`` fit every limit of ``queue``.

        ``task_names`` are the tasks of that job type; ``evicted`` is told each id deleted.
        Raises QueueLimitReached under the ``reject`` policy.
        """
        type_limit = self.per_job_type.get(job_type)
        if type_limit is not None:
            live: list[Job] = []
            for name in sorted(task_names):
                live.extend(reversed(await all_jobs(app, queue, LIVE_STATES, task=name)))
            # Each task's jobs are oldest first (by enqueue order); the stable sort interleaves
            # the type's tasks without reordering jobs enqueued in the same millisecond.
            live.sort(key=lambda j: j.enqueued_ms)
            what = f"per_job_type_limits[{job_type!r}] ({type_limit})"
            await self._enforce(app, live, type_limit, what, evicted)
        if self.max_queue_size is not None:
            # Counting is one cheap query; the jobs are listed only at the limit.
            counts = (await app.counts(queue)).get(queue, {})
            if sum(counts.get(s, 0) for s in LIVE_STATES) >= self.max_queue_size:
                live = list(reversed(await all_jobs(app, queue, LIVE_STATES)))
                what = f"max_queue_size ({self.max_queue_size})"
                await self._enforce(app, live, self.max_queue_size, what, evicted)

    async def _enforce(
        self,
        app: Conveyor,
        live_oldest_first: list[Job],
        limit: int,
        what: str,
        evicted: Callable[[str], None],
    ) -> None:
        excess = len(live_oldest_first) - limit + 1
        if excess <= 0:
            return
        if self.policy == "reject":
            raise QueueLimitReached(
                f"{what} reached: {len(live_oldest_first)} job(s) not finished; wait for some "
                "to finish, delete some, raise the limit, or use limit_policy='evict'"
            )
        for job in live_oldest_first[:excess]:
            logger.warning(
                "%s reached: deleting the oldest unfinished job %s (%s, %s) to add a new one",
                what,
                job.id,
                job.task,
                job.state,
                extra={"action": "delete", "job_id": job.id, "queue": job.queue},
            )
            with contextlib.suppress(JobNotFound):  # it went away by itself meanwhile
                await app.delete(job.id)
            evicted(job.id)
