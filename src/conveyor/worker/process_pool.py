"""The process executor: a pool of spawned children, one job at a time each, replaced when they die.

Why not :class:`concurrent.futures.ProcessPoolExecutor`: one dead child breaks the whole pool
(``BrokenProcessPool`` fails *every* pending future), a running call cannot be stopped, and its
shutdown joins without a bound. Here each child is a long-lived ``spawn`` process (never fork: the
worker's threads, sockets and event loop must not be copied) with its own pipe, so a timeout or a
cancellation kills just that child (SIGTERM, then SIGKILL after ``term_grace_s``), a crash fails
just that child's job with :class:`WorkerLostError`, and a fresh child takes the slot.

The parent never blocks its loop on a pipe: each pipe and each process sentinel is watched with
``loop.add_reader`` and read without blocking. Spawning a child (``Process.start``: fork+exec of a
fresh interpreter) takes ~1-3 ms on the loop; the child's imports happen in the child.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.util  # its atexit hook must be registered before ours (see below)
import os
import signal
import socket
import struct
import weakref
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final

import msgspec

from conveyor.context import JobContext, current_context
from conveyor.errors import ConfigurationError
from conveyor.worker import child as wire
from conveyor.worker.executors import DEFAULT_PROCESS_NICE, BaseExecutor, timeout_message
from conveyor.worker.interfaces import JobTimeoutError, RemoteError, WorkerLostError

if TYPE_CHECKING:
    from conveyor.task import Task

log = logging.getLogger(__name__)

__all__ = ["ProcessExecutor"]

#: Seconds between SIGTERM and SIGKILL when a job is stopped.
DEFAULT_TERM_GRACE_S: Final = 1.0
#: Seconds start() waits for every child to report ready.
DEFAULT_START_TIMEOUT_S: Final = 60.0
#: How long to wait for the kernel to reap a SIGKILLed child before giving up on it.
_REAP_TIMEOUT_S: Final = 2.0
#: Respawn delays after a child dies before it is ready (an import error would loop forever).
_RESPAWN_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
_READ_CHUNK: Final = 256 * 1024
_READS_PER_CALLBACK: Final = 16  # one chatty child cannot starve the loop


def describe_exit(exitcode: int | None) -> str:
    """``exited with code 3``, ``killed by SIGKILL (signal 9)`` or ``exit status unknown``."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name} (signal {-exitcode})"
    return f"exited with code {exitcode}"


def _frame(payload: bytes) -> bytes:
    """A ``multiprocessing.connection`` frame, which the child's ``recv_bytes`` reads."""
    if len(payload) > 0x7FFFFFFF:
        return struct.pack("!iQ", -1, len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


class _Inflight:
    """The job a child is running: its context and the future :meth:`ProcessExecutor.run` awaits."""

    __slots__ = ("ctx", "future")

    def __init__(self, ctx: JobContext, future: asyncio.Future[Any]) -> None:
        self.ctx = ctx
        self.future = future


class _Child:
    """One spawned process and the parent's non-blocking end of its pipe."""

    def __init__(
        self, process: BaseProcess, sock: socket.socket, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.sock = sock
        self.state = "starting"  # starting -> idle <-> busy -> stopping -> dead
        self.job: _Inflight | None = None
        self.buffer = bytearray()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        # Nobody may be awaiting these (a respawned child's ready, say): mark them retrieved.
        self.ready.add_done_callback(_retrieve)
        self.exited.add_done_callback(_retrieve)

    def __repr__(self) -> str:
        return f"<child pid={self.pid} {self.state}>"


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# Pools whose children must die with this process, even if nobody called shutdown().
_live_pools: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()


@atexit.register
def _kill_children_at_exit() -> None:
    # Registered after multiprocessing's own hook, so it runs first (atexit is LIFO): that hook
    # joins non-daemon children without a timeout, and a child in a stuck job would hang exit.
    for pool in list(_live_pools):
        pool.kill_now()


class ProcessExecutor(BaseExecutor):
    """Runs tasks in ``concurrency`` spawned child processes, one job per child at a time.

    The child imports the task's module and finds the function by the module and qualified name
    the parent took from its own registry (``task.fn``), never by a name from a job payload.
    Arguments and results cross the pipe as JSON. What the job prints, logs and reports
    (``ctx.progress``/``ctx.log``) reaches the parent's job context in order.

    ``free_slots`` is ``concurrency`` minus running jobs: a slot whose child is being replaced
    counts as free, and a job started on it waits for the new child (see :attr:`idle`).

    Args:
        concurrency: number of child processes.
        preload: modules each child imports at start (e.g. the task modules, so the first job
            does not pay for the import).
        term_grace_s: how long a child gets between SIGTERM and SIGKILL when its job is stopped.
        start_timeout_s: how long :meth:`start` waits for the children to be ready.
        nice: how much lower than the parent's the children's CPU priority is (0 to 19; 0 keeps
            the parent's). The parent's event loop renews leases and starts and commits every
            job: when children compete with it for the CPU (CPU-bound jobs on every core, or a
            child being respawned - an interpreter start - while jobs run), it must win, or its
            heartbeats run late and other jobs slow down. On an otherwise idle machine the
            children still get all the CPU the parent does not use.
    """

    kind = "process"

    def __init__(
        self,
        concurrency: int,
        *,
        preload: Sequence[str] = (),
        term_grace_s: float = DEFAULT_TERM_GRACE_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        nice: int = DEFAULT_PROCESS_NICE,
    ) -> None:
        super().__init__(concurrency)
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ConfigurationError(
                f"nice must be an integer from 0 (the parent's priority) to 19, got {nice!r}"
            )
        self.nice = nice
        self._mp = multiprocessing.get_context("spawn")
        self._preload = list(preload)
        self._term_grace_s = term_grace_s
        self._start_timeout_s = start_timeout_s
        self._children: set[_Child] = set()  # every child not yet reaped
        self._waiters: list[asyncio.Future[_Child]] = []  # run() calls waiting for a respawn
        self._tasks: set[asyncio.Task[Any]] = set()  # kills in progress, owned by the pool
        self._respawns: set[asyncio.TimerHandle] = set()
        self._failed_starts = 0
        self._serial = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(wire.ChildMessage)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def idle(self) -> int:
        """Children ready for a job right now (``free_slots`` also counts slots being refilled)."""
        return sum(1 for c in self._children if c.state == "idle")

    @property
    def pids(self) -> list[int]:
        """Pids of the live children (starting, idle or busy), sorted."""
        return sorted(c.pid for c in self._children if c.state in ("starting", "idle", "busy"))

    def pid_of(self, job_id: str) -> int | None:
        """The pid of the child running ``job_id``, if any."""
        for c in self._children:
            if c.job is not None and c.job.ctx.job_id == job_id:
                return c.pid
        return None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the children; returns once every one of them is ready for jobs."""
        if self._started:
            return
        if self._closed:
            raise RuntimeError("process executor is shut down; build a new one")
        self._loop = asyncio.get_running_loop()
        _live_pools.add(self)
        try:
            children = [self._spawn() for _ in range(self.concurrency)]
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.gather(*(c.ready for c in children))
        except BaseException as exc:
            await self.shutdown(self._term_grace_s + 1)
            if isinstance(exc, TimeoutError):
                raise WorkerLostError(
                    f"process children were not ready within {self._start_timeout_s} s"
                ) from None
            raise
        self._started = True

    def _spawn(self) -> _Child:
        assert self._loop is not None
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        process = self._mp.Process(
            target=wire.main,
            args=(child_conn, os.getpid(), self._preload),
            name=f"conveyor-process-{next(self._serial)}",
            # Not a daemon: daemonic processes may not start processes of their own, which a
            # task may need. The atexit hook above kills children the pool did not stop.
            daemon=False,
        )
        process.start()
        self._lower_priority(process.pid)
        child_conn.close()  # only the child holds its end now, so its death reads as EOF here
        sock = socket.socket(fileno=os.dup(parent_conn.fileno()))
        parent_conn.close()
        sock.setblocking(False)
        child = _Child(process, sock, self._loop)
        self._children.add(child)
        self._loop.add_reader(sock.fileno(), self._on_readable, child)
        self._loop.add_reader(process.sentinel, self._on_sentinel, child)
        log.debug("spawned process child %d", child.pid)
        return child

    def _lower_priority(self, pid: int | None) -> None:
        # Set from the parent, right after the fork: the child's interpreter start and imports,
        # its most CPU-hungry moment, already run at the lower priority.
        if not self.nice or pid is None or not hasattr(os, "setpriority"):
            return
        try:
            mine = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, pid, min(19, mine + self.nice))
        except OSError as exc:  # the child already died (reaped as usual), or a sandbox forbids it
            log.debug("could not lower the priority of process child %s: %s", pid, exc)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop the children within about ``timeout_s``: a stop message, then SIGTERM/SIGKILL.

        Idle children exit at once; busy ones after their job, or are killed when the time is
        up (their :meth:`run` raises :class:`WorkerLostError`). No child outlives this call
        unless the kernel cannot reap a SIGKILLed process.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_refilling()
        if self._loop is None:
            return
        loop = asyncio.get_running_loop()
        timeout_s = max(0.0, timeout_s)
        # Keep time for SIGTERM, its grace and SIGKILL out of the budget.
        kill_reserve_s = min(timeout_s / 2, self._term_grace_s + 0.5)
        graceful_until = loop.time() + timeout_s - kill_reserve_s
        # 1. Ask every child to stop: idle ones exit now, busy ones when their job ends.
        self._send_stop()
        # 2. Wait for them until the graceful part of the budget is spent.
        pending = [c.exited for c in self._children]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, graceful_until - loop.time()))
        # 3. Kill the rest, and wait for kills started earlier by timeouts and cancellations.
        for c in [c for c in self._children if c.state != "stopping"]:
            self._kill_in_background(c, grace_s=kill_reserve_s)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=kill_reserve_s + _REAP_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()  # only a kill the kernel would not complete is left
        # 4. Whatever the kernel did not reap in time: stop watching it and say so.
        for c in list(self._children):
            log.error("process child %d did not exit after SIGKILL; giving up on it", c.pid)
            self._forget(c, None)
        _live_pools.discard(self)

    def _stop_refilling(self) -> None:
        """No more respawns, and run() calls waiting for one fail."""
        for handle in self._respawns:
            handle.cancel()
        self._respawns.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(WorkerLostError("the process executor shut down"))
        self._waiters.clear()

    def _send_stop(self) -> None:
        stop = _frame(self._encoder.encode(wire.Stop()))
        for c in self._children:
            if c.state in ("starting", "idle", "busy") and c.sock.fileno() >= 0:
                with contextlib.suppress(OSError):  # a full or broken pipe: it gets killed
                    c.sock.send(stop)

    def kill_now(self) -> None:
        """SIGKILL every child and reap it, synchronously (for interpreter exit)."""
        for c in list(self._children):
            with contextlib.suppress(Exception):
                c.process.kill()
                c.process.join(1)

    # -- running jobs ----------------------------------------------------------------------------

    async def run(self, task: Task[Any, Any], ctx: JobContext, timeout_s: float | None) -> Any:
        """Run the task in an idle child; a timeout or cancellation kills that child."""
        module = getattr(task.fn, "__module__", None)
        qualname = getattr(task.fn, "__qualname__", None)
        if not module or not qualname or module == "__main__" or "<locals>" in qualname:
            raise ConfigurationError(
                f"task {task.name} runs in a process child, which imports it by module and "
                f"name; define it as a module-level function in an importable module"
            )
        message = wire.RunJob(ctx.job, module, qualname, task.takes_context)
        self._check_can_run(task)
        self._running += 1
        token = current_context.set(ctx)
        try:
            child = await self._acquire()
            loop = asyncio.get_running_loop()
            inflight = _Inflight(ctx, loop.create_future())
            child.job = inflight
            timeout = asyncio.timeout(timeout_s)
            try:
                async with timeout:
                    try:
                        await loop.sock_sendall(child.sock, _frame(self._encoder.encode(message)))
                    except (OSError, ValueError):
                        # The child died under us (its pipe is broken or already closed): its
                        # exit, once reaped, fails the job with WorkerLostError.
                        if child.state != "stopping":
                            self._kill_in_background(child)
                    return await inflight.future
            except TimeoutError:
                if not timeout.expired():
                    raise
                ctx.cancel()
                await self._stop_job(child, inflight, "timed out")
                raise JobTimeoutError(timeout_message(task, ctx, timeout_s)) from None
            except asyncio.CancelledError:
                ctx.cancel()
                await self._stop_job(child, inflight, "was cancelled")
                raise
        finally:
            current_context.reset(token)
            self._running -= 1

    async def _acquire(self) -> _Child:
        """Claim an idle child, or wait for the one refilling a slot (a respawn takes ~0.2 s).

        A slot whose child died or was killed counts as free (``free_slots`` is ``concurrency``
        minus running jobs) so that capacity comes back when a run ends: the fetcher re-checks
        ``free_slots`` only then, and must not stall while a replacement child starts.
        """
        for c in self._children:
            if c.state == "idle":
                c.state = "busy"
                return c
        assert self._loop is not None
        waiter: asyncio.Future[_Child] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._start_timeout_s):
                return await waiter
        except TimeoutError:
            raise WorkerLostError(
                f"no process child became ready within {self._start_timeout_s} s"
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._make_idle(waiter.result())  # handed over just as we were cancelled
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _make_idle(self, child: _Child) -> None:
        """``child`` is free: hand it to a waiting run() or mark it idle."""
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                child.state = "busy"
                waiter.set_result(child)
                return
        child.state = "idle"

    async def _stop_job(self, child: _Child, inflight: _Inflight, why: str) -> None:
        """Kill ``child`` if it is still running ``inflight``; returns once it is dead."""
        if child.job is not inflight:
            return  # it finished just as the deadline hit; the child is fine
        child.job = None  # later messages from the dying child are dropped
        log.warning(
            "job %s %s; stopping its process child %d",
            inflight.ctx.job_id,
            why,
            child.pid,
            extra={"action": "kill_child", "job_id": inflight.ctx.job_id},
        )
        kill = self._kill_in_background(child)
        # Shielded: a second cancellation stops our wait, not the kill (the pool owns it).
        await asyncio.shield(kill)

    def _kill_in_background(
        self, child: _Child, grace_s: float | None = None
    ) -> asyncio.Task[None]:
        child.state = "stopping"
        grace_s = self._term_grace_s if grace_s is None else grace_s
        task = asyncio.get_running_loop().create_task(self._kill(child, grace_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _kill(self, child: _Child, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns once reaped (bounded)."""
        if child.exited.done():
            return
        # Process.terminate/kill signal only a child that has not been reaped, so a recycled
        # pid is never hit.
        child.process.terminate()
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(child.exited)
            return
        except TimeoutError:
            pass
        log.warning("process child %d ignored SIGTERM for %s s; SIGKILL", child.pid, grace_s)
        child.process.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REAP_TIMEOUT_S):
                await asyncio.shield(child.exited)

    # -- reading from children (loop callbacks) --------------------------------------------------

    def _on_readable(self, child: _Child) -> None:
        self._read(child)

    def _read(self, child: _Child) -> bool:
        """Read and handle what the child sent; True if there may be more to read now."""
        for _ in range(_READS_PER_CALLBACK):
            if child.sock.fileno() < 0:
                return False
            try:
                data = child.sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                data = b""
            if not data:
                # EOF: the child is exiting; its sentinel reports the exit status.
                self._unwatch_pipe(child)
                return False
            child.buffer += data
            self._parse(child)
        return True

    def _parse(self, child: _Child) -> None:
        buf = child.buffer
        while len(buf) >= 4:
            (size,) = struct.unpack_from("!i", buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    return
                (size,) = struct.unpack_from("!Q", buf, 4)
                start = 12
            if len(buf) < start + size:
                return
            payload = bytes(buf[start : start + size])
            del buf[: start + size]
            try:
                message = self._decoder.decode(payload)
            except msgspec.DecodeError:
                log.error("process child %d sent an undecodable message; killing it", child.pid)
                buf.clear()
                if child.state != "stopping":
                    self._kill_in_background(child)
                return
            try:
                self._dispatch(child, message)
            except Exception:
                log.exception("handling a message from process child %d failed", child.pid)

    def _dispatch(self, child: _Child, message: wire.ChildMessage) -> None:
        inflight = child.job
        ctx = inflight.ctx if inflight is not None else None
        if isinstance(message, wire.Ready):
            if child.state == "starting":
                self._failed_starts = 0
                if not child.ready.done():
                    child.ready.set_result(None)
                self._make_idle(child)
        elif isinstance(message, wire.Output):
            if ctx is not None and message.job_id == ctx.job_id:
                stdout = message.stream == "stdout"
                ctx.log(message.line if stdout else f"[{message.stream}] {message.line}")
            else:
                level = logging.INFO if message.stream == "stdout" else logging.WARNING
                log.log(level, "process child %d %s: %s", child.pid, message.stream, message.line)
        elif ctx is None or message.job_id != ctx.job_id:
            return  # from a job given up on (timed out or cancelled): nobody wants it
        elif isinstance(message, wire.Progress):
            ctx.progress(message.percent, message.description)
        elif isinstance(message, wire.Log):
            ctx.log(message.line)
        else:
            assert inflight is not None
            if not inflight.future.done():
                if isinstance(message, wire.Done):
                    inflight.future.set_result(message.result)
                else:
                    inflight.future.set_exception(
                        RemoteError(
                            message.error_type,
                            message.message,
                            message.traceback,
                            delay_s=message.delay_s,
                        )
                    )
            child.job = None
            if child.state == "busy":
                self._make_idle(child)

    def _on_sentinel(self, child: _Child) -> None:
        """The child process ended: read what it sent before dying, then reap it."""
        assert self._loop is not None
        self._loop.remove_reader(child.process.sentinel)
        while self._read(child):  # finite: the writer is dead
            pass
        self._reap(child, attempts=100)

    def _reap(self, child: _Child, attempts: int) -> None:
        # The sentinel fires when the child's descriptors close, a moment before the kernel
        # lets waitpid() collect it; poll briefly instead of blocking the loop.
        exitcode = child.process.exitcode
        if exitcode is None and attempts > 0:
            assert self._loop is not None
            self._loop.call_later(0.01, self._reap, child, attempts - 1)
            return
        self._forget(child, exitcode)

    def _unwatch_pipe(self, child: _Child) -> None:
        if child.sock.fileno() >= 0:
            assert self._loop is not None
            self._loop.remove_reader(child.sock.fileno())
            child.sock.close()

    def _forget(self, child: _Child, exitcode: int | None) -> None:
        """``child`` is gone: fail its job, release its resources, refill its slot."""
        if child not in self._children:
            return
        assert self._loop is not None
        was = child.state
        child.state = "dead"
        self._children.discard(child)
        self._unwatch_pipe(child)
        with contextlib.suppress(Exception):
            self._loop.remove_reader(child.process.sentinel)
        if exitcode is not None:
            with contextlib.suppress(ValueError):
                child.process.close()
        how = describe_exit(exitcode)
        inflight, child.job = child.job, None
        if inflight is not None and not inflight.future.done():
            inflight.future.set_exception(
                WorkerLostError(
                    f"the process child (pid {child.pid}) running job {inflight.ctx.job_id} "
                    f"died: {how}"
                )
            )
            log.warning(
                "process child %d running job %s died: %s",
                child.pid,
                inflight.ctx.job_id,
                how,
                extra={"action": "worker_lost", "job_id": inflight.ctx.job_id},
            )
        if not child.ready.done():
            child.ready.set_exception(
                WorkerLostError(f"process child {child.pid} {how} before it was ready")
            )
        if not child.exited.done():
            child.exited.set_result(exitcode)
        if self._closed or not self._started:
            return
        if was == "starting":
            # Dying before ready is a setup problem (an import error, say): back off.
            delay = _RESPAWN_BACKOFF_S[min(self._failed_starts, len(_RESPAWN_BACKOFF_S) - 1)]
            self._failed_starts += 1
            log.error(
                "process child %d %s before it was ready; respawning in %s s", child.pid, how, delay
            )
            self._respawn_later(delay)
        else:
            self._respawn()

    def _respawn_later(self, delay_s: float) -> None:
        assert self._loop is not None
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._respawns.discard(handle)
            self._respawn()

        handle = self._loop.call_later(delay_s, fire)
        self._respawns.add(handle)

    def _respawn(self) -> None:
        """Spawn a child if fewer than ``concurrency`` are alive (dying ones do not count)."""
        if self._closed:
            return
        live = sum(1 for c in self._children if c.state != "stopping")
        if live < self.concurrency:
            try:
                self._spawn()
            except Exception:
                log.exception("could not spawn a process child; retrying")
                self._respawn_later(_RESPAWN_BACKOFF_S[-1])
