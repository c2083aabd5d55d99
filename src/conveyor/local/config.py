"""QueueConfig: the validated settings of a conveyor.local WorkQueue (seed 003's model)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["QueueConfig"]


class QueueConfig(BaseModel):
    """Configuration options for work queues (``WorkQueue.from_config``).

    This is the in-process queue's configuration from seed 003. The durable queue's
    ``QueueConfig`` of seed 002 is a different class, :class:`conveyor.compat.QueueConfig` (it
    owns a conveyor app and its broker); the two share a name only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_capacity: int = Field(default=100, ge=1)
    """Maximum number of queued items (``WorkQueue`` ``maxsize``); at least 1."""
    capacity_refresh_time: float = Field(default=1.0, gt=0)
    """Seconds between refreshes of a rate-limited consumer's capacity; positive. Kept for seed
    003's callers: ``WorkQueue`` itself does not rate-limit and does not read it."""
    concurrency_limit: int | None = Field(default=None, ge=1)
    """Maximum number of concurrent workers; at least 1 if given."""
