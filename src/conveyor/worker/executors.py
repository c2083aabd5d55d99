"""The executors a worker runs jobs on: coroutines on the loop, daemon threads, spawned processes.

Every executor implements :class:`conveyor.worker.interfaces.Executor`: a fixed ``concurrency``,
``free_slots`` (what the fetcher may reserve now), ``start``, ``run`` and a bounded, idempotent
``shutdown``. ``run`` passes the job context first iff the task takes it, then the job's args and
kwargs, and sets :data:`conveyor.context.current_context` while the job runs so that log capture
(:mod:`conveyor.worker.capture`) attributes records to the job.

Calling ``run`` with no free slot is a bug in the caller (the fetcher reserves only
``free_slots`` jobs), so it raises :class:`RuntimeError` instead of queueing silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from conveyor.context import JobContext, current_context
from conveyor.errors import ConfigurationError
from conveyor.worker.interfaces import ExecutionError, JobTimeoutError, WorkerLostError

if TYPE_CHECKING:
    from conveyor.task import Task
    from conveyor.worker.interfaces import Executor
    from conveyor.worker.process_pool import ProcessExecutor

log = logging.getLogger(__name__)

#: How much lower than the worker's a process child's CPU priority is, by default (see
#: :class:`~conveyor.worker.process_pool.ProcessExecutor`: the worker's event loop must win).
DEFAULT_PROCESS_NICE: Final = 10

__all__ = ["AsyncExecutor", "ProcessExecutor", "ThreadExecutor", "make_executor"]


def __getattr__(name: str) -> Any:
    # ProcessExecutor lives in process_pool (which builds on this module); importing it lazily
    # avoids a cycle and keeps multiprocessing out of workers that never use processes.
    if name == "ProcessExecutor":
        from conveyor.worker.process_pool import ProcessExecutor

        return ProcessExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def call_arguments(task: Task[Any, Any], ctx: JobContext) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments for one run: ``ctx`` first iff the task takes it."""
    args = list(ctx.job.args)
    if task.takes_context:
        args.insert(0, ctx)
    return args, dict(ctx.job.kwargs)


def timeout_message(task: Task[Any, Any], ctx: JobContext, timeout_s: float | None) -> str:
    """The message of a :class:`JobTimeoutError` for this run."""
    return (
        f"job {ctx.job_id} ({task.name}) ran longer than its timeout of {timeout_s} s and was "
        "stopped; raise the task's timeout_s if it needs longer"
    )


class BaseExecutor:
    """Concurrency validation, slot accounting and lifecycle checks shared by the executors."""

    kind: str = ""

    def __init__(self, concurrency: int) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(
                f"{self.kind} executor concurrency must be an integer >= 1, got {concurrency!r}"
            )
        self.concurrency: int = concurrency
        self._running = 0
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} concurrency={self.concurrency} running={self._running} "
            f"started={self._started} closed={self._closed}>"
        )

    @property
    def running(self) -> int:
        """How many jobs are running now."""
        return self._running

    @property
    def free_slots(self) -> int:
        """How many more jobs it can start right now (0 before ``start`` and after ``shutdown``)."""
        if not self._started or self._closed:
            return 0
        return max(0, self.concurrency - self._running)

    def _check_can_run(self, task: Task[Any, Any]) -> None:
        """Raise RuntimeError for a run the caller should never have asked for."""
        if self._closed:
            raise RuntimeError(f"{self.kind} executor is shut down; cannot run {task.name}")
        if not self._started:
            raise RuntimeError(f"{self.kind} executor is not started; call await start() first")
        if self._running >= self.concurrency:
            raise RuntimeError(
                f"{self.kind} executor is full ({self._running}/{self.concurrency} running); "
                f"reserve at most free_slots jobs before calling run() for {task.name}"
            )


class AsyncExecutor(BaseExecutor):
    """Runs coroutine functions on the worker's event loop, at most ``concurrency`` at a time.

    A timeout cancels the coroutine and raises :class:`JobTimeoutError` (after ``ctx.cancel()``);
    cancelling the task awaiting :meth:`run` cancels the coroutine and re-raises
    ``CancelledError``. A coroutine that swallows cancellation keeps running: the executor
    cannot stop it, and the worker's shutdown is what bounds it.
    """

    kind = "async"

    async def start(self) -> None:
        """Nothing to prepare: coroutines run on the caller's loop."""
        self._started = True

    async def run(self, task: Task[Any, Any], ctx: JobContext, timeout_s: float | None) -> Any:
        """Await the task's coroutine with ``timeout_s``; return its result or raise its error."""
        self._check_can_run(task)
        args, kwargs = call_arguments(task, ctx)
        if timeout_s is None:
            # The common case, kept lean (no timeout context, no timer): cancellation alone
            # can stop the run.
            self._running += 1
            token = current_context.set(ctx)
            try:
                return await task.fn(*args, **kwargs)
            except asyncio.CancelledError:
                ctx.cancel()
                raise
            finally:
                current_context.reset(token)
                self._running -= 1
        self._running += 1
        token = current_context.set(ctx)
        loop = asyncio.get_running_loop()
        timeout = asyncio.timeout(None)

        def expire() -> None:
            # Set the flag before the cancellation is delivered, so the coroutine's cleanup
            # (``finally``/``except CancelledError``) already sees ``ctx.cancelled``.
            ctx.cancel()
            timeout.reschedule(loop.time())

        timer = loop.call_later(timeout_s, expire)
        try:
            try:
                async with timeout:
                    return await task.fn(*args, **kwargs)
            except TimeoutError:
                # The task's own TimeoutError (e.g. from a nested timeout) passes through as is;
                # only ours becomes JobTimeoutError.
                if not timeout.expired():
                    raise
                ctx.cancel()
                raise JobTimeoutError(timeout_message(task, ctx, timeout_s)) from None
            except asyncio.CancelledError:
                ctx.cancel()
                raise
        finally:
            timer.cancel()
            current_context.reset(token)
            self._running -= 1

    async def shutdown(self, timeout_s: float) -> None:
        """Refuse new runs. Running coroutines belong to the worker, which cancels them."""
        self._closed = True


class _PoolThread:
    """One OS thread of a :class:`ThreadExecutor`; ``abandoned`` once its job was given up on."""

    __slots__ = ("abandoned", "thread")

    def __init__(self) -> None:
        self.abandoned = False
        self.thread: threading.Thread | None = None


class _ThreadJob:
    """One run handed to the pool: the call, and the asyncio future its outcome goes to."""

    __slots__ = (
        "args",
        "cancelled",
        "context",
        "ctx",
        "finished",
        "fn",
        "future",
        "kwargs",
        "loop",
        "worker",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.ctx = ctx
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        # The caller's contextvars, with current_context pointing at this job, so that log
        # capture and anything else reading context variables works inside the thread.
        self.context = contextvars.copy_context()
        self.context.run(current_context.set, ctx)
        self.worker: _PoolThread | None = None  # the thread that took it (under the pool lock)
        self.cancelled = False  # given up on: a thread that has not taken it yet must skip it
        self.finished = False


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Schedule ``callback`` on ``loop`` from a thread; a closed loop means nobody is waiting."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


class ThreadExecutor(BaseExecutor):
    """Runs sync functions on ``concurrency`` daemon threads fed by a queue.

    Why not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined at interpreter
    exit (and by ``shutdown(wait=True)``, which has no timeout), so one job stuck in a blocking
    call would keep the worker process alive forever. These threads are daemons and are never
    joined without a bound.

    A Python thread cannot be killed. On a timeout or cancellation the job's ``ctx.cancelled``
    is set (cooperative tasks check it or use ``ctx.wait_cancelled``), :meth:`run` fails at once,
    and the thread is *abandoned*: it finishes its call in the background, its outcome is
    dropped, and then it exits. A fresh thread takes its place immediately so the pool keeps
    ``concurrency`` usable threads (capacity stays honest); :attr:`abandoned` counts them.
    """

    kind = "thread"

    def __init__(self, concurrency: int, *, name_prefix: str = "conveyor-thread") -> None:
        super().__init__(concurrency)
        self._name_prefix = name_prefix
        self._queue: queue.SimpleQueue[_ThreadJob | None] = queue.SimpleQueue()
        # Guards the thread sets and each job's worker/cancelled/finished fields, which the
        # loop (abandon) and the pool threads (take, finish) both change.
        self._lock = threading.Lock()
        self._threads: set[_PoolThread] = set()  # usable threads (not abandoned)
        self._abandoned_alive: set[_PoolThread] = set()
        self._abandoned_total = 0
        self._inflight: set[_ThreadJob] = set()
        self._serial = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_exited: asyncio.Event | None = None

    @property
    def abandoned(self) -> int:
        """How many threads were abandoned (timed out or cancelled jobs) since start."""
        return self._abandoned_total

    @property
    def abandoned_running(self) -> int:
        """How many abandoned threads are still running their job."""
        with self._lock:
            return len(self._abandoned_alive)

    @property
    def threads(self) -> int:
        """How many usable (not abandoned) pool threads are alive."""
        with self._lock:
            return len(self._threads)

    async def start(self) -> None:
        """Start the pool's ``concurrency`` daemon threads."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._thread_exited = asyncio.Event()
        with self._lock:
            for _ in range(self.concurrency):
                self._spawn_locked()
        self._started = True

    def _spawn_locked(self) -> None:
        worker = _PoolThread()
        thread = threading.Thread(
            target=self._thread_main,
            args=(worker,),
            name=f"{self._name_prefix}-{next(self._serial)}",
            daemon=True,  # never keeps the process alive at exit: see the class docstring
        )
        worker.thread = thread
        self._threads.add(worker)
        thread.start()

    async def run(self, task: Task[Any, Any], ctx: JobContext, timeout_s: float | None) -> Any:
        """Run the task's function on a pool thread; fail at ``timeout_s`` (the thread is left)."""
        self._check_can_run(task)
        args, kwargs = call_arguments(task, ctx)
        job = _ThreadJob(task.fn, args, kwargs, ctx, asyncio.get_running_loop())
        self._running += 1
        self._inflight.add(job)
        token = current_context.set(ctx)
        self._queue.put(job)
        try:
            timeout = asyncio.timeout(timeout_s)
            try:
                async with timeout:
                    return await job.future
            except TimeoutError:
                if not timeout.expired():
                    raise  # the function's own TimeoutError
                ctx.cancel()
                self._abandon(job, "timed out")
                raise JobTimeoutError(timeout_message(task, ctx, timeout_s)) from None
            except asyncio.CancelledError:
                ctx.cancel()
                self._abandon(job, "cancelled")
                raise
        finally:
            current_context.reset(token)
            self._inflight.discard(job)
            self._running -= 1

    def _abandon(self, job: _ThreadJob, why: str) -> None:
        """Give up on ``job``: if a thread is running it, leave that thread and start another."""
        with self._lock:
            job.cancelled = True
            worker = job.worker
            if worker is None or job.finished or worker.abandoned:
                return  # not taken yet (the thread will skip it), or already done
            worker.abandoned = True
            self._threads.discard(worker)
            self._abandoned_alive.add(worker)
            self._abandoned_total += 1
            if not self._closed:
                self._spawn_locked()
        log.warning(
            "job %s %s; its thread %s cannot be killed and is abandoned (it exits when the "
            "call returns); %d abandoned so far",
            job.ctx.job_id,
            why,
            worker.thread.name if worker.thread else "?",
            self._abandoned_total,
            extra={"action": "abandon_thread", "job_id": job.ctx.job_id, "queue": job.ctx.queue},
        )

    def _thread_main(self, me: _PoolThread) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                with self._lock:
                    if job.cancelled:
                        continue
                    job.worker = me
                self._run_one(job)
                with self._lock:
                    job.finished = True
                    abandoned = me.abandoned
                del job  # drop the result and traceback while idle
                if abandoned:
                    return  # a replacement already took this thread's place
        finally:
            with self._lock:
                self._threads.discard(me)
                self._abandoned_alive.discard(me)
            if self._loop is not None and self._thread_exited is not None:
                _call_soon_threadsafe(self._loop, self._thread_exited.set)

    @staticmethod
    def _run_one(job: _ThreadJob) -> None:
        try:
            result = job.context.run(job.fn, *job.args, **job.kwargs)
        except Exception as exc:
            error: BaseException = exc
        except BaseException as exc:
            # SystemExit/KeyboardInterrupt set on an asyncio future would be re-raised out of
            # the event loop and stop the worker; a job may only fail, so wrap them.
            error = ExecutionError(
                f"the task raised {exc!r}; a job may only raise Exception subclasses"
            )
            error.__cause__ = exc
        else:

            def set_result() -> None:
                if not job.future.done():
                    job.future.set_result(result)

            _call_soon_threadsafe(job.loop, set_result)
            return

        def set_error() -> None:
            if not job.future.done():
                job.future.set_exception(error)

        _call_soon_threadsafe(job.loop, set_error)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop the threads within ``timeout_s``; jobs still running then are abandoned.

        Running jobs normally belong to the worker, which cancels them first; any still running
        at the deadline get ``ctx.cancelled`` set and their :meth:`run` raises
        :class:`WorkerLostError`. Daemon threads left behind never block process exit.
        """
        if self._closed:
            return
        self._closed = True
        if not self._started or self._loop is None or self._thread_exited is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        with self._lock:
            count = len(self._threads)
        for _ in range(count):
            self._queue.put(None)  # each usable thread exits when it takes one
        while True:
            self._thread_exited.clear()
            with self._lock:
                if not self._threads:
                    break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self._thread_exited.wait()
            except TimeoutError:
                break
        for job in list(self._inflight):
            if job.future.done():
                continue
            job.ctx.cancel()
            self._abandon(job, "was still running at shutdown")
            job.future.set_exception(
                WorkerLostError(
                    f"job {job.ctx.job_id} was still running in a thread when the executor "
                    f"shut down after {timeout_s} s; the thread is abandoned"
                )
            )
        if self._threads:
            log.warning(
                "thread executor shut down with %d thread(s) still busy", len(self._threads)
            )


def make_executor(
    kind: str,
    concurrency: int,
    *,
    preload: Sequence[str] = (),
    process_nice: int = DEFAULT_PROCESS_NICE,
) -> Executor:
    """Build the executor for ``kind`` (``async``, ``thread`` or ``process``).

    ``preload`` names modules each process child imports when it starts, and ``process_nice``
    how much lower the children's CPU priority is than the worker's (both ignored otherwise).
    """
    if kind == "async":
        return AsyncExecutor(concurrency)
    if kind == "thread":
        return ThreadExecutor(concurrency)
    if kind == "process":
        from conveyor.worker.process_pool import ProcessExecutor

        return ProcessExecutor(concurrency, preload=preload, nice=process_nice)
    raise ConfigurationError(f"executor kind must be 'async', 'thread' or 'process', got {kind!r}")
