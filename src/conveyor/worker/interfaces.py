"""What the worker's parts agree on: the executor protocol and the errors a run can end in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from conveyor.context import JobContext
    from conveyor.task import Task


class ExecutionError(ConveyorError):
    """A job's run ended abnormally (see the subclasses)."""


class JobTimeoutError(ExecutionError):
    """The job ran longer than its timeout and was stopped; raise timeout_s if it needs longer."""


class WorkerLostError(ExecutionError):
    """The process running the job died (killed, crashed or exited) before reporting an outcome."""


class RemoteError(ExecutionError):
    """The task raised in a process child; ``remote_type`` names the original exception class.

    Retry policies match it by ``remote_type`` (``retry_on``/``give_up_on``), and a
    :class:`~conveyor.retry.Retry` raised in the child keeps its ``delay_s``.

    Attributes:
        remote_type: qualified name of the exception class raised in the child.
        remote_traceback: the traceback text from the child.
        delay_s: the exception's ``delay_s`` (a ``Retry``'s requested delay), if it had one.
    """

    def __init__(
        self,
        remote_type: str,
        message: str,
        remote_traceback: str,
        *,
        delay_s: float | None = None,
    ) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.delay_s = delay_s


class Executor(Protocol):
    """Runs task functions with a fixed concurrency; the fetcher reserves only its free slots.

    ``run`` raises what the task raised (a process child's exception as :class:`RemoteError`),
    :class:`JobTimeoutError` after ``timeout_s`` and :class:`WorkerLostError` if a child dies.
    If the awaiting asyncio task is cancelled, the executor stops the work as far as it can
    (async: cancelled; thread: ``ctx.cancelled`` set and the thread abandoned; process: the child
    is terminated, SIGTERM then SIGKILL) and re-raises ``CancelledError``.
    """

    kind: str
    concurrency: int

    @property
    def free_slots(self) -> int:
        """How many more jobs it can start right now."""
        ...

    async def start(self) -> None:
        """Prepare pools (processes are spawned here); returns when ready."""
        ...

    async def run(self, task: Task[Any, Any], ctx: JobContext, timeout_s: float | None) -> Any:
        """Run ``task`` with the job's args/kwargs (``ctx.job``) and return its result."""
        ...

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting work and release pools within ``timeout_s`` (bounded, never hangs)."""
        ...
