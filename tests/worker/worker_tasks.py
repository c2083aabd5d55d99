"""Plain module-level functions the worker tests register as tasks.

Process-executor children import this module by name (it must be importable, not __main__), so
the functions live here undecorated; each test registers them on its own app.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def proc_wait(pid_file: str, seconds: float) -> str:
    """Record this process's pid, then sleep (a process job to cancel)."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "woke"


def proc_noop(i: int) -> int:
    """A trivial process job."""
    return i


def proc_die(code: int) -> None:
    """Kill the process running the job (a poison job)."""
    os._exit(code)


def proc_raise(message: str) -> None:
    """Raise ValueError in the child."""
    raise ValueError(message)


def proc_retry_later(delay_s: float) -> None:
    """Ask for another attempt after ``delay_s`` from the child (conveyor.retry.Retry)."""
    from conveyor.retry import Retry

    raise Retry(delay_s=delay_s)
