"""Seed 004's job-manager API: ``QueueManagerIntegration``, ``QueueJobBase`` and the global manager.

A thin face over conveyor's client, worker and process executor, split by responsibility:

* :mod:`~conveyor.compat.seed004_job` - job classes (``JobBase`` / ``QueueJobBase``) and how a
  process child runs one;
* :mod:`~conveyor.compat.seed004_manager` - the manager (``JobManager`` /
  ``QueueManagerIntegration``): add, start, stop, delete, status, logs, limits, retention;
* :mod:`~conveyor.compat.seed004_status` - statuses in the seed's vocabulary, the log split.

This module adds the seed's ``init_global_queue_manager``, ``get_global_queue_manager`` and
``shutdown_global_queue_manager``. They keep **the one module-level singleton in conveyor**, a
convenience of this face only (the seed's FastAPI startup/shutdown hooks use it); everywhere
else, build and pass a :class:`JobManager` explicitly. The global manager belongs to the event
loop that initialised it. How each part maps to conveyor is in ``docs/seed004.md``.
"""

from __future__ import annotations

from typing import Unpack

from conveyor.compat.seed004_job import JobBase, JobReportedError, QueueJobBase
from conveyor.compat.seed004_manager import (
    JobManager,
    JobManagerOptions,
    LimitPolicy,
    QueueManagerIntegration,
)
from conveyor.compat.seed004_status import JobStatus, QueueJobResult
from conveyor.errors import ConfigurationError

__all__ = [
    "JobBase",
    "JobManager",
    "JobManagerOptions",
    "JobReportedError",
    "JobStatus",
    "LimitPolicy",
    "QueueJobBase",
    "QueueJobResult",
    "QueueManagerIntegration",
    "get_global_queue_manager",
    "init_global_queue_manager",
    "shutdown_global_queue_manager",
]

# The one module-level singleton in conveyor (see the module docstring).
_global_manager: JobManager | None = None


async def init_global_queue_manager(**options: Unpack[JobManagerOptions]) -> JobManager:
    """Build and start the global job manager (the seed's startup hook); returns it.

    Takes :class:`JobManager`'s keyword arguments (the seed's ``registry_path``,
    ``shutdown_timeout``, ``max_concurrent_jobs``, ``in_memory``, ``max_queue_size``,
    ``per_job_type_limits``, ``completed_job_retention_seconds``, and conveyor's additions).
    Raises ConfigurationError if a global manager is already running.
    """
    global _global_manager
    if _global_manager is not None and _global_manager.state != "stopped":
        raise ConfigurationError(
            "the global queue manager is already initialised; call "
            "shutdown_global_queue_manager() before initialising another"
        )
    manager = JobManager(**options)
    # Claimed before the await, so that a concurrent init sees it and fails instead of
    # starting a second manager.
    _global_manager = manager
    try:
        await manager.start()
    except BaseException:
        _global_manager = None
        raise
    return manager


async def get_global_queue_manager() -> JobManager:
    """The global job manager; raises ConfigurationError if it is not running."""
    if _global_manager is None or not _global_manager.running:
        raise ConfigurationError(
            "the global queue manager is not running; await init_global_queue_manager(...) "
            "at startup first"
        )
    return _global_manager


async def shutdown_global_queue_manager() -> None:
    """Shut the global job manager down (the seed's shutdown hook); idempotent."""
    global _global_manager
    manager, _global_manager = _global_manager, None
    if manager is not None:
        await manager.shutdown()
