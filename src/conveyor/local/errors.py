"""Errors raised by the in-process queues of :mod:`conveyor.local`.

::

    ConveyorError
    └── QueueError            a local queue refused an operation
        ├── QueueFullError    the queue is full and its overflow policy refuses the item
        ├── QueueEmptyError   no item is available (no-wait get, or get timed out)
        └── QueueStateError   the queue's lifecycle state does not allow the operation

Each class's docstring is its default message; the raising site adds the context (state, size).
"""

from __future__ import annotations

from conveyor.errors import ConveyorError


class QueueError(ConveyorError):
    """The local queue refused the operation."""


class QueueFullError(QueueError):
    """The queue is full; retry later, use put() to wait with backpressure, or raise maxsize."""

    def __init__(self, message: str | None = None, *, maxsize: int | None = None) -> None:
        super().__init__(message)
        self.maxsize = maxsize


class QueueEmptyError(QueueError):
    """The queue has no item; put items first, or wait with get() and a longer timeout."""


class QueueStateError(QueueError):
    """The queue's state does not allow this operation; start() it first, or it is stopping."""

    def __init__(
        self, message: str | None = None, *, operation: str = "", status: str = ""
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
