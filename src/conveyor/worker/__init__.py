"""The worker: runs jobs from the broker with leases, retries, timeouts and a bounded shutdown."""

from conveyor.worker.worker import Worker

__all__ = ["Worker"]
