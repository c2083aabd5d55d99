"""A process-executor child: the wire protocol to its parent, and the loop running its jobs.

The parent (:mod:`conveyor.worker.process_pool`) spawns ``main`` with one end of a
``multiprocessing.Pipe``. Frames are ``multiprocessing.connection`` frames (a 4-byte big-endian
length, then the payload) whose payloads are msgspec JSON messages, never pickles:

* parent -> child: :class:`RunJob` (the job record plus the module and qualified name the *parent*
  took from its task registry), :class:`Stop`.
* child -> parent: :class:`Ready` once, then per job any number of :class:`Progress`,
  :class:`Log` and :class:`Output` (a captured stdout/stderr line) and one :class:`Done` or
  :class:`Failed`. :class:`Output` with no job id is output printed between jobs.

The child ignores SIGINT (Ctrl+C reaches the whole process group; the parent decides how to
shut down), keeps SIGTERM's default action (the parent's way to stop a job), and exits on its own
if the parent dies. This module is imported by every child, so it imports little.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import io
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

import msgspec

from conveyor.codec import Codec
from conveyor.context import JobContext, current_context
from conveyor.job import Job
from conveyor.worker.capture import CAPTURE_FORMAT, install_capture, is_conveyor_logger

# -- wire protocol ----------------------------------------------------------------------------


class RunJob(msgspec.Struct, tag="run"):
    """Run ``job`` with the function at ``module``:``qualname`` (resolved from the registry)."""

    job: Job
    module: str
    qualname: str
    takes_context: bool


class Stop(msgspec.Struct, tag="stop"):
    """Exit after the current job (the parent is shutting down)."""


class Ready(msgspec.Struct, tag="ready"):
    """The child has started and waits for jobs."""

    pid: int


class Progress(msgspec.Struct, tag="progress"):
    """``ctx.progress(...)`` in the job."""

    job_id: str
    percent: int | None
    description: str | None


class Log(msgspec.Struct, tag="log"):
    """``ctx.log(...)`` or a captured logging record in the job."""

    job_id: str
    line: str


class Output(msgspec.Struct, tag="output"):
    """One line written to ``sys.stdout``/``sys.stderr`` (``stream``); ``job_id`` None between jobs.

    ``stream`` is ``stdout``, ``stderr`` or ``log`` (a logging record emitted outside a job).
    """

    job_id: str | None
    stream: str
    line: str


class Done(msgspec.Struct, tag="done"):
    """The job returned ``result``."""

    job_id: str
    result: Any


class Failed(msgspec.Struct, tag="failed"):
    """The job raised: the exception's qualified class name, its message and the traceback text.

    ``delay_s`` carries the exception's numeric ``delay_s`` attribute (a
    :class:`~conveyor.retry.Retry`'s requested delay), so the parent's retry policy honours it.
    """

    job_id: str
    error_type: str
    message: str
    traceback: str
    delay_s: float | None = None


ParentMessage = RunJob | Stop
ChildMessage = Ready | Progress | Log | Output | Done | Failed

#: How often the child checks that its parent is still alive.
PARENT_POLL_S: Final = 0.5
#: A partial line longer than this is sent anyway (a progress bar redrawn with '\r' forever).
MAX_LINE_CHARS: Final = 64 * 1024


def qualified_name(cls: type) -> str:
    """``ValueError`` for builtins, ``package.module.Class`` otherwise."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_function(module: str, qualname: str) -> Callable[..., Any]:
    """Import ``module`` and return the function at ``qualname`` (a Task is unwrapped to .fn)."""
    if "<locals>" in qualname:
        raise LookupError(
            f"{module}.{qualname} is defined inside a function; define it at module level"
        )
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    fn = getattr(obj, "fn", obj)  # a conveyor Task keeps the function as .fn
    if not callable(fn):
        raise TypeError(f"{module}.{qualname} is not callable")
    return fn  # type: ignore[no-any-return]


# -- the child side of the pipe ---------------------------------------------------------------


class _Channel:
    """The child's sending end: one frame at a time from any thread."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        self.job_id: str | None = None  # the running job, for attributing output lines

    def send(self, message: ChildMessage) -> None:
        data = self._encoder.encode(message)
        with self._lock:
            try:
                self._conn.send_bytes(data)
            except OSError:
                # The parent is gone; nobody will read another result, and an orphan must not
                # keep running user code.
                os._exit(1)


class _PipeReporter:
    """The child's Reporter: progress and log lines go over the pipe to the parent's context."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def report_progress(self, job: Job, progress: int | None, description: str | None) -> None:
        self._channel.send(Progress(job.id, progress, description))

    def report_log(self, job: Job, line: str) -> None:
        self._channel.send(Log(job.id, line))


class _LineWriter(io.TextIOBase):
    """A text stream that sends each complete line over the pipe, tagged with its stream name."""

    def __init__(self, channel: _Channel, stream: str, original: Any) -> None:
        super().__init__()
        self._channel = channel
        self._stream = stream
        self._original = original
        self._buffer = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # C-level writers (faulthandler, subprocesses) get the inherited descriptor; only
        # Python-level writes are captured.
        return int(self._original.fileno())

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer or len(self._buffer) > MAX_LINE_CHARS:
                line, sep, rest = self._buffer.partition("\n")
                if not sep:
                    line, rest = self._buffer[:MAX_LINE_CHARS], self._buffer[MAX_LINE_CHARS:]
                self._buffer = rest
                self._channel.send(Output(self._channel.job_id, self._stream, line))
        return len(text)

    def flush(self) -> None:
        """Keep a partial line until its newline (``print(..., end="")`` must not split it)."""

    def flush_partial(self) -> None:
        """Send a trailing partial line (at the end of a job)."""
        with self._lock:
            if self._buffer:
                line, self._buffer = self._buffer, ""
                self._channel.send(Output(self._channel.job_id, self._stream, line))


class _OutsideJobHandler(logging.Handler):
    """Sends the parent records the job log does not take (between jobs, or conveyor's own)."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__(logging.WARNING)
        self._channel = channel
        self.setFormatter(logging.Formatter(CAPTURE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if current_context.get() is not None and not is_conveyor_logger(record.name):
            return  # the capture handler puts it in the job's log
        try:
            self._channel.send(Output(None, "log", self.format(record)))
        except Exception:
            self.handleError(record)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies, even in the middle of a job (an orphan serves nobody)."""

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="conveyor-parent-watch", daemon=True).start()


def _run_job(message: RunJob, channel: _Channel, codec: Codec) -> Done | Failed:
    job = message.job
    ctx = JobContext(job, _PipeReporter(channel))
    token = current_context.set(ctx)
    channel.job_id = job.id
    try:
        fn = resolve_function(message.module, message.qualname)
        args: list[Any] = [ctx, *job.args] if message.takes_context else list(job.args)
        if inspect.iscoroutinefunction(fn):
            result = asyncio.run(fn(*args, **job.kwargs))
        else:
            result = fn(*args, **job.kwargs)
        # Same rules as the worker applies to results: what cannot round-trip through JSON
        # fails here, with a message naming the offending value.
        codec.check_value(result, what=f"the result of {job.task}")
        return Done(job.id, result)
    except BaseException as exc:  # SystemExit too: the job failed, the child carries on
        return Failed(
            job.id, qualified_name(type(exc)), str(exc), traceback.format_exc(), _delay_of(exc)
        )
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _LineWriter):
                stream.flush_partial()
        channel.job_id = None
        current_context.reset(token)


def _delay_of(exc: BaseException) -> float | None:
    """The exception's ``delay_s`` (a ``Retry``'s requested delay) if it is a finite number."""
    delay = getattr(exc, "delay_s", None)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not math.isfinite(delay):
        return None
    return float(delay)


def main(conn: Connection, parent_pid: int, preload: list[str]) -> None:
    """The child's entry point (spawned by the parent): serve jobs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel(conn)
    _watch_parent(parent_pid)
    sys.stdout = _LineWriter(channel, "stdout", sys.__stdout__)
    sys.stderr = _LineWriter(channel, "stderr", sys.__stderr__)
    install_capture(logging.INFO)
    logging.getLogger().addHandler(_OutsideJobHandler(channel))
    for module in preload:
        importlib.import_module(module)
    # Sizes are the worker's business (it applies its own cap); this codec only checks that a
    # result round-trips through JSON.
    codec = Codec(max_payload_bytes=2**62)
    decoder = msgspec.json.Decoder(ParentMessage)
    channel.send(Ready(os.getpid()))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            os._exit(1)  # the parent closed the pipe or died: nothing more will come
        message = decoder.decode(data)
        if isinstance(message, Stop):
            return
        channel.send(_run_job(message, channel, codec))
