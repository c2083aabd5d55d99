"""conveyor.local: bounded in-process queues (BoundedQueue, WorkQueue) for one event loop."""

from __future__ import annotations

from conveyor.local.bounded import (
    BoundedQueue,
    ErrorHandler,
    OverflowPolicy,
    QueueStatus,
    WorkerFunc,
)
from conveyor.local.config import QueueConfig
from conveyor.local.errors import QueueEmptyError, QueueError, QueueFullError, QueueStateError
from conveyor.local.work import BatchOutcome, WorkQueue

__all__ = [
    "BatchOutcome",
    "BoundedQueue",
    "ErrorHandler",
    "OverflowPolicy",
    "QueueConfig",
    "QueueEmptyError",
    "QueueError",
    "QueueFullError",
    "QueueStateError",
    "QueueStatus",
    "WorkQueue",
    "WorkerFunc",
]
