"""Faces of conveyor that reproduce the APIs of its source documents (see docs/seed002.md).

``from conveyor.compat import QueueConfig, QueueManager, QueueWorker, QueueRetryConfig`` gives
seed 002's queue; :mod:`conveyor.compat.utils` its resilience decorators.
"""

from conveyor.compat.seed002 import QueueConfig, QueueManager, QueueRetryConfig, QueueWorker
from conveyor.compat.seed004 import (
    JobBase,
    JobManager,
    JobStatus,
    QueueJobBase,
    QueueJobResult,
    QueueManagerIntegration,
    get_global_queue_manager,
    init_global_queue_manager,
    shutdown_global_queue_manager,
)

__all__ = [
    "JobBase",
    "JobManager",
    "JobStatus",
    "QueueConfig",
    "QueueJobBase",
    "QueueJobResult",
    "QueueManager",
    "QueueManagerIntegration",
    "QueueRetryConfig",
    "QueueWorker",
    "get_global_queue_manager",
    "init_global_queue_manager",
    "shutdown_global_queue_manager",
]
