"""The Worker: starts the executors and loops, tracks held jobs, and shuts down in ordered steps.

One supervisor task owns a TaskGroup with every background loop (fetcher, committer, reporter,
reaper, heartbeat, loop monitor); a loop that dies is logged loudly, stops the worker gracefully,
and its exception is raised from :meth:`Worker.run` / :meth:`Worker.wait_closed`. Job runs are
tasks in a set the worker owns (not in the TaskGroup): a job that ignores cancellation must not be
able to hold the worker's exit hostage, so the shutdown (its ordered, bounded steps are in
:mod:`conveyor.worker.shutdown`) waits for runs with a bound and moves on.

The broker: the app's broker belongs to the app. The worker connects it if needed but never closes
it (close the app, e.g. ``async with app:``). The worker closes only what it opened: the
heartbeat's own connection (see :mod:`conveyor.worker.heartbeat`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Self

from conveyor.errors import BrokerReadOnly, BrokerUnavailable, ConfigurationError
from conveyor.job import validate_queue_name
from conveyor.metrics import Metrics
from conveyor.task import EXECUTOR_KINDS
from conveyor.worker.committer import Committer
from conveyor.worker.executors import DEFAULT_PROCESS_NICE
from conveyor.worker.fetcher import Fetcher, Slots
from conveyor.worker.heartbeat import Heartbeat, LoopMonitor, heartbeat_broker_factory
from conveyor.worker.leases import HeldJobs
from conveyor.worker.reaper import Reaper
from conveyor.worker.reporter import BrokerReporter
from conveyor.worker.runner import Runner
from conveyor.worker.shutdown import shutdown, shutdown_executors
from conveyor.worker.signals import install as install_signal_handlers

if TYPE_CHECKING:
    from conveyor.brokers.base import Broker
    from conveyor.client import Conveyor
    from conveyor.worker.interfaces import Executor

logger = logging.getLogger(__name__)

#: A fetch loop with a free slot that shows no progress for this long is reported unhealthy.
#: Between two signs of progress it makes one bounded broker call (5 s socket or busy timeout by
#: default), or waits at most 1 s for jobs, or backs off at most 2 s: only a stuck loop gets here.
FETCH_STALL_S: Final = 6.0


def _default_concurrency() -> dict[str, int]:
    return {"async": 100, "thread": 8, "process": os.cpu_count() or 1}


class Worker:
    """Runs jobs of ``app``'s registered tasks from the broker, with leases, retries and metrics.

    Args:
        app: the application (its broker and registry).
        queues: queues to consume, served in this order (default: the queues of the registered
            tasks, else the app's default queue).
        concurrency: slots per executor kind, overriding ``{"async": 100, "thread": 8,
            "process": os.cpu_count()}``; only executors some registered task uses are started.
        lease_s: lease length; a dead worker's jobs run again within ``lease_s + scan_interval_s``.
        heartbeat_s: how often leases are renewed (and revoked ones noticed, stopping the run).
        scan_interval_s: how often expired leases are recovered and due jobs promoted.
        grace_period_s: how long a stop waits for running jobs before cancelling and releasing.
        burst: stop by itself once the queues are empty, nothing runs, and no scheduled job of
            its queues falls due within ``burst_wait_s`` (so retries in backoff still run; a
            job scheduled further out is left for a later worker).
        burst_wait_s: see ``burst``.
        executors: the executor kinds to start (default: those the registered tasks use); name
            them when tasks will be registered after the worker is built.
        worker_id: recorded on reserved jobs (default: ``host:pid:random``).
        max_commit_batch: the most acks written per broker call.
        install_signals: stop on SIGINT/SIGTERM (first: graceful, second: immediate).
        callback_timeout_s: the bound on each on_success/on_failure callback.
        capture_logs: copy ``logging`` records emitted inside a job into the job's log (see
            :mod:`conveyor.worker.capture`; lowers the root logger to INFO while running).
        process_nice: how much lower than the worker's the process children's CPU priority is
            (0-19, default 10; 0 keeps the worker's), so that the event loop renewing leases
            and starting jobs is never starved by them.
    """

    #: Leases are renewed, and revoked ones (cancel, delete) noticed, this often by default.
    DEFAULT_HEARTBEAT_S: ClassVar[float] = 0.25

    def __init__(
        self,
        app: Conveyor,
        *,
        queues: Sequence[str] | None = None,
        concurrency: Mapping[str, int] | None = None,
        lease_s: float = 10.0,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        scan_interval_s: float = 2.0,
        grace_period_s: float = 10.0,
        burst: bool = False,
        burst_wait_s: float = 10.0,
        executors: Sequence[str] | None = None,
        worker_id: str | None = None,
        max_commit_batch: int = 100,
        install_signals: bool = False,
        callback_timeout_s: float = 10.0,
        capture_logs: bool = True,
        process_nice: int = DEFAULT_PROCESS_NICE,
    ) -> None:
        _check_positive(lease_s=lease_s, heartbeat_s=heartbeat_s, scan_interval_s=scan_interval_s)
        if heartbeat_s >= lease_s:
            raise ConfigurationError(
                f"heartbeat_s ({heartbeat_s}) must be shorter than lease_s ({lease_s}); "
                "renew leases several times per lease (e.g. heartbeat_s = lease_s / 4)"
            )
        if (
            grace_period_s < 0
            or burst_wait_s < 0
            or callback_timeout_s <= 0
            or max_commit_batch < 1
        ):
            raise ConfigurationError(
                "grace_period_s and burst_wait_s must be >= 0, callback_timeout_s > 0 and "
                "max_commit_batch >= 1"
            )
        self.app = app
        self.broker: Broker = app.broker
        tasks = list(app.registry)
        if queues is None:
            queues = sorted({t.options.queue for t in tasks}) or [app.default_queue]
        if not queues:
            raise ConfigurationError("queues must name at least one queue")
        self.queues = [validate_queue_name(q) for q in dict.fromkeys(queues)]
        self.concurrency = _default_concurrency()
        for kind, n in (concurrency or {}).items():
            if kind not in EXECUTOR_KINDS or not isinstance(n, int) or n < 1:
                raise ConfigurationError(
                    f"concurrency takes {EXECUTOR_KINDS} mapped to integers >= 1, got {kind}={n!r}"
                )
            self.concurrency[kind] = n
        if executors is not None:
            # Tasks may be registered after the worker is built (the compat faces register a
            # function on its first enqueue): the caller names the executors to run, and every
            # queue may need any of them.
            unknown = [k for k in executors if k not in EXECUTOR_KINDS]
            if unknown or not executors:
                raise ConfigurationError(
                    f"executors takes a non-empty list of {EXECUTOR_KINDS}, got {list(executors)!r}"
                )
            self.kinds = [k for k in EXECUTOR_KINDS if k in executors]
            self.queue_kinds = {q: list(self.kinds) for q in self.queues}
        else:
            used = {t.options.executor for t in tasks}
            self.kinds = [k for k in EXECUTOR_KINDS if k in used] or ["async"]
            self.queue_kinds = {
                q: sorted({t.options.executor for t in tasks if t.options.queue == q}) or self.kinds
                for q in self.queues
            }
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.scan_interval_s = scan_interval_s
        self.grace_period_s = grace_period_s
        self.burst = burst
        self.burst_wait_s = burst_wait_s
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.max_commit_batch = max_commit_batch
        self.install_signals = install_signals
        self.callback_timeout_s = callback_timeout_s
        self.capture_logs = capture_logs
        if (
            isinstance(process_nice, bool)
            or not isinstance(process_nice, int)
            or not 0 <= process_nice <= 19
        ):
            raise ConfigurationError(
                f"process_nice must be an integer from 0 (the worker's own CPU priority) to 19, "
                f"got {process_nice!r}"
            )
        self.process_nice = process_nice
        self.metrics = Metrics(self.worker_id)
        self._state = "new"
        self._executors: dict[str, Executor] = {}
        self._crash: BaseException | None = None
        self._grace = grace_period_s
        self._supervisor: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] | None = None  # resolved once fully stopped
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._uninstall_signals: Callable[[], None] | None = None
        self._uninstall_capture: Callable[[], None] | None = None
        self._closing = _Closing(self)

    # -- public lifecycle ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``running``, ``stopping`` or ``stopped``."""
        return self._state

    async def start(self) -> None:
        """Start executors and loops; returns once the worker is consuming (or trying to)."""
        if self._state != "new":
            raise ConfigurationError(f"a worker starts once; this one is {self._state}")
        self._state = "starting"
        self._done = asyncio.get_running_loop().create_future()
        self._stop_requested = asyncio.Event()
        self._immediate = asyncio.Event()
        try:
            await self._start()
        except BaseException:
            self._state = "stopped"
            await shutdown_executors(self)
            if self._uninstall_capture is not None:
                self._uninstall_capture()
            _resolve(self._done)
            raise
        if self.install_signals:
            try:
                self._uninstall_signals = install_signal_handlers(self)
            except (ValueError, RuntimeError, NotImplementedError):
                # Not the main thread, or no signal support: do not leave a worker running.
                await self.stop(grace_period_s=0)
                raise
        logger.info(
            "worker %s started: queues %s, executors %s, lease %.1f s, heartbeat %s",
            self.worker_id,
            ",".join(self.queues),
            ",".join(f"{k}={self._executors[k].concurrency}" for k in self._executors),
            self.lease_s,
            "thread" if self._heartbeat.threaded else "loop task",
            extra={"action": "worker_start"},
        )

    def stop(self, *, grace_period_s: float | None = None) -> _Closing:
        """Stop (idempotent): returns the same awaitable every time; awaiting it waits for the end.

        A later call with a shorter grace shortens it; ``grace_period_s=0`` cancels and releases
        running jobs now. Cancelling an ``await worker.stop()`` does not interrupt the shutdown.
        """
        grace = self.grace_period_s if grace_period_s is None else max(0.0, grace_period_s)
        if self._state == "new":
            self._state = "stopped"
            return self._closing
        if self._state == "stopped":
            return self._closing
        if not self._stop_requested.is_set():
            self._grace = grace
            self._state = "stopping"
            self._stop_requested.set()
            if grace <= 0:
                self._immediate.set()
        elif grace < self._grace:
            self._grace = grace
            if grace <= 0:
                self._immediate.set()
        return self._closing

    async def wait_closed(self) -> None:
        """Wait until the worker has stopped; raises the error of a loop that died, if one did."""
        await self._closing
        if self._crash is not None:
            raise self._crash

    async def run(self) -> None:
        """Start, then wait until stopped (by :meth:`stop`, a signal, or burst mode draining).

        Cancelling ``run()`` (``asyncio.run`` does it on Ctrl-C) stops the worker gracefully
        and waits for it; a second cancellation stops waiting (the shutdown itself goes on).
        """
        await self.start()
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.stop()
            await self._closing
            raise

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def health(self) -> dict[str, Any]:
        """Liveness as progress: state, circuits, whether it consumes, last reserve, lag.

        ``healthy`` is false while stopping or stopped, while a broker circuit is open, when the
        fetch loop has died, and when it has shown no progress for ``FETCH_STALL_S`` although a
        slot is free (alive but stuck). Cheap and synchronous: call it from a probe.
        """
        parts = [getattr(self, name, None) for name in ("_fetcher", "_reaper", "_committer")]
        parts.append(getattr(self, "_heartbeat", None))
        circuits = {p.circuit.name: p.circuit.snapshot() for p in parts if p is not None}
        is_open = any(c["state"] == "open" for c in circuits.values())
        fetch_loop = self._loops.get("fetcher")
        fetcher: Fetcher | None = getattr(self, "_fetcher", None)
        # Progress, not mere existence: a fetch loop that is alive but stuck is not consuming.
        stalled_s = fetcher.stalled_s() if fetcher is not None else 0.0
        consuming = (
            self._state == "running"
            and fetch_loop is not None
            and not fetch_loop.done()
            and not (fetcher is not None and fetcher.circuit.is_open)
            and stalled_s <= FETCH_STALL_S
        )
        monitor = getattr(self, "_monitor", None)
        held: HeldJobs | None = getattr(self, "_held", None)
        return {
            "worker_id": self.worker_id,
            "state": self._state,
            "healthy": consuming and not is_open,
            "circuit": "open" if is_open else "closed",
            "circuits": circuits,
            "consuming": consuming,
            "last_reserve_ms": fetcher.last_reserve_ms if fetcher is not None else 0,
            "fetch_stalled_s": round(stalled_s, 3),
            "running": len(held) if held is not None else 0,
            "lag": monitor.lag_s if monitor is not None else 0.0,
            "max_lag_s": monitor.max_lag_s if monitor is not None else 0.0,
            "queues": list(self.queues),
        }

    # -- start -----------------------------------------------------------------------------------

    async def _start(self) -> None:
        from conveyor.worker.capture import install_capture
        from conveyor.worker.executors import make_executor

        self._loop = loop = asyncio.get_running_loop()
        if self.capture_logs:
            self._uninstall_capture = install_capture()
        try:
            await self.app.connect()
        except (BrokerUnavailable, BrokerReadOnly) as exc:
            # Not fatal: the loops keep trying with backoff and report unhealthy meanwhile.
            logger.warning(
                "worker %s: broker unavailable at start (%s); will keep trying",
                self.worker_id,
                exc,
                extra={"action": "connect"},
            )
        # Process children import the process tasks' modules when they start, so that the
        # first job does not pay for the import.
        preload = sorted(
            {
                t.fn.__module__
                for t in self.app.registry
                if t.options.executor == "process" and t.fn.__module__ != "__main__"
            }
        )
        for kind in self.kinds:
            self._executors[kind] = make_executor(
                kind, self.concurrency[kind], preload=preload, process_nice=self.process_nice
            )
        await asyncio.gather(*(ex.start() for ex in self._executors.values()))
        for name, ex in self._executors.items():
            self.metrics.bind_executor(name, ex.concurrency, functools.partial(_busy, ex))
        self._slots = Slots(self._executors, self.queue_kinds)
        self._held = held = HeldJobs(
            registry=self.app.registry,
            metrics=self.metrics,
            slots=self._slots,
            burst=self.burst,
            worker_id=self.worker_id,
        )
        self.metrics.bind_running(held.__len__)
        self._committer = Committer(
            self.broker,
            max_batch=self.max_commit_batch,
            on_settled=held.settled,
            worker_id=self.worker_id,
        )
        self._reporter = BrokerReporter(self.broker, worker_id=self.worker_id)
        self._runner = Runner(
            self.app,
            executors=self._executors,
            slots=self._slots,
            committer=self._committer,
            reporter=self._reporter,
            callback_timeout_s=self.callback_timeout_s,
            worker_id=self.worker_id,
        )
        held.run_job = self._runner.run_job
        self._fetcher = Fetcher(
            self.broker,
            self.queues,
            self._slots,
            spawn=held.spawn,
            lease_s=self.lease_s,
            worker_id=self.worker_id,
            metrics=self.metrics,
            ensure_connected=self.app.connect,
            burst=self.burst,
            is_idle=held.idle,
            committer=self._committer,
            burst_wait_s=self.burst_wait_s,
        )
        self._reaper = Reaper(
            self.broker,
            self.queues,
            scan_interval_s=self.scan_interval_s,
            metrics=self.metrics,
            ensure_connected=self.app.connect,
            worker_id=self.worker_id,
        )
        self._monitor = LoopMonitor()
        self._heartbeat = Heartbeat(
            broker=self.broker,
            broker_factory=heartbeat_broker_factory(self.app, self.worker_id),
            leases=held.leases,
            on_lost=held.leases_lost,
            lease_s=self.lease_s,
            heartbeat_s=self.heartbeat_s,
            monitor=self._monitor,
            worker_id=self.worker_id,
        )
        ready: asyncio.Future[None] = loop.create_future()
        self._supervisor = loop.create_task(
            self._supervise(ready), name=f"conveyor-worker-{self.worker_id}"
        )
        self._supervisor.add_done_callback(self._supervisor_done)
        await asyncio.wait((ready, self._supervisor), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            await self._supervisor  # it failed before it was ready: raise why
        if self._state == "starting":
            self._state = "running"

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for name, coro in (
                    ("committer", self._committer.run()),
                    ("reporter", self._reporter.run()),
                    ("monitor", self._monitor.run()),
                    ("heartbeat", self._heartbeat.run()),
                    ("reaper", self._reaper.run()),
                    ("fetcher", self._fetcher.run()),
                ):
                    self._loops[name] = tg.create_task(
                        self._guard(name, coro), name=f"conveyor-{name}-{self.worker_id}"
                    )
                ready.set_result(None)
                try:
                    await self._stop_requested.wait()
                except asyncio.CancelledError:
                    # Cancelled from outside (the loop is going away): still give the jobs
                    # back, with no grace and within the usual bounds, then re-raise.
                    self.stop(grace_period_s=0)
                    await shutdown(self)
                    raise
                await shutdown(self)
                for task in self._loops.values():
                    task.cancel()
        finally:
            self._state = "stopped"
            _resolve(self._done)
            if self._uninstall_signals is not None:
                self._uninstall_signals()
            if self._uninstall_capture is not None:
                self._uninstall_capture()
            logger.info("worker %s stopped", self.worker_id, extra={"action": "worker_stop"})

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        """Record a failure of the supervisor itself (a bug in the shutdown) as the crash."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.critical(
                "worker %s: its supervisor failed",
                self.worker_id,
                exc_info=exc,
                extra={"action": "worker_crash"},
            )
            if self._crash is None:
                self._crash = exc

    async def _guard(self, name: str, coro: Awaitable[None]) -> None:
        """Run one loop; if it dies, log it loudly and stop the worker (run() re-raises)."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            logger.critical(
                "worker %s: its %s loop died; stopping the worker",
                self.worker_id,
                name,
                exc_info=exc,
                extra={"action": "worker_crash", "loop": name},
            )
            if self._crash is None:
                self._crash = exc
            self.stop()
            return
        if name == "fetcher" and self._fetcher.drained:
            logger.info(
                "worker %s: queues drained (burst mode); stopping",
                self.worker_id,
                extra={"action": "burst_drained"},
            )
            self.stop()


class _Closing:
    """What :meth:`Worker.stop` returns: awaiting it waits (shielded) for the worker to stop."""

    __slots__ = ("_worker",)

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        done = self._worker._done
        if done is None:
            return  # never started
        # shield: a caller that gives up waiting must not cancel the shutdown itself.
        await asyncio.shield(done)


def _busy(executor: Executor) -> int:
    # free_slots is 0 for a shut-down executor; prefer its own count of running jobs.
    running = getattr(executor, "running", None)
    if isinstance(running, int):
        return running
    return executor.concurrency - executor.free_slots


def _resolve(done: asyncio.Future[None] | None) -> None:
    if done is not None and not done.done():
        done.set_result(None)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigurationError(f"{name} must be > 0, got {value!r}")


__all__ = ["Worker"]
