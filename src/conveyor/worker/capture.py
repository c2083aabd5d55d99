"""Job log capture: a logging handler that copies records emitted while a job runs into its log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from conveyor.context import JobContext, current_context

#: How a captured record reads in the job's log ("LEVEL logger: message", then any traceback).
CAPTURE_FORMAT = "%(levelname)s %(name)s: %(message)s"

# conveyor's own records (the worker, brokers, reporters) are never copied into a job's log:
# the reporter that stores a log line may itself log, and copying that record back into the
# job would recurse without end.
_OWN_LOGGER = "conveyor"


def is_conveyor_logger(name: str) -> bool:
    """Whether ``name`` is one of conveyor's own loggers (``conveyor`` or ``conveyor.*``)."""
    return name == _OWN_LOGGER or name.startswith(_OWN_LOGGER + ".")


class JobLogHandler(logging.Handler):
    """Sends each record emitted inside a job to that job's log via ``ctx.log``.

    The job is found through :data:`conveyor.context.current_context`, which every executor
    sets while a job runs (copied into thread jobs, set in process children), so records from
    code that knows nothing about conveyor are attributed to the right job. Records emitted
    outside a job, and records from ``conveyor.*`` loggers, are ignored by this handler (other
    handlers still see them).
    """

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(CAPTURE_FORMAT))
        # Guards against re-entry on the same thread: a Reporter that logs through a
        # non-conveyor logger while we are handing it a line must not loop back into us.
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        """Format ``record`` and append it to the current job's log, if a job is running."""
        ctx = current_context.get()
        if not isinstance(ctx, JobContext) or is_conveyor_logger(record.name):
            return
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            ctx.log(self.format(record))
        except Exception:
            self.handleError(record)
        finally:
            self._local.busy = False


def install_capture(level: int | None = logging.INFO) -> Callable[[], None]:
    """Install one :class:`JobLogHandler` on the root logger; returns a callable that removes it.

    Args:
        level: make sure records at this level reach the handler by lowering the root logger's
            level to it if it is higher (Python's default root level, WARNING, would drop a
            job's ``logger.info(...)``). The previous level is restored on uninstall. ``None``
            leaves the root level alone. Note that other handlers on the root logger without
            a level of their own will then also see records at this level.

    The returned callable is idempotent. Install once per worker (or process child).
    """
    root = logging.getLogger()
    handler = JobLogHandler()
    previous_level = root.level
    if level is not None and root.getEffectiveLevel() > level:
        root.setLevel(level)
    root.addHandler(handler)
    removed = False

    def uninstall() -> None:
        nonlocal removed
        if removed:
            return
        removed = True
        root.removeHandler(handler)
        if level is not None and root.level == level:
            root.setLevel(previous_level)

    return uninstall
