"""Seed 002's queue API (``QueueConfig``, ``QueueManager``, ``QueueWorker``, ``QueueRetryConfig``).

A thin face over conveyor's client and worker, split by responsibility:

* :mod:`~conveyor.compat.seed002_config` - the shared app, registration, metrics;
* :mod:`~conveyor.compat.seed002_manager` - enqueue, batch, status, purge;
* :mod:`~conveyor.compat.seed002_worker` - the worker;
* :mod:`~conveyor.compat.seed002_retry` - retry schedules;
* :mod:`~conveyor.compat.seed002_callbacks` - the seed's callback data dict.

How each part maps to conveyor, and where it deliberately differs, is in ``docs/seed002.md``.
"""

from conveyor.compat.seed002_config import QueueConfig
from conveyor.compat.seed002_manager import QueueManager
from conveyor.compat.seed002_retry import QueueRetryConfig
from conveyor.compat.seed002_worker import QueueWorker

__all__ = ["QueueConfig", "QueueManager", "QueueRetryConfig", "QueueWorker"]
