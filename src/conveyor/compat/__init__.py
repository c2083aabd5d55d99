"""Faces of conveyor that reproduce the APIs of its source documents (see docs/seed002.md).

``from conveyor.compat import QueueConfig, QueueManager, QueueWorker, QueueRetryConfig`` gives
seed 002's queue; :mod:`conveyor.compat.utils` its resilience decorators.
"""

from conveyor.compat.seed002 import QueueConfig, QueueManager, QueueRetryConfig, QueueWorker

__all__ = ["QueueConfig", "QueueManager", "QueueRetryConfig", "QueueWorker"]
