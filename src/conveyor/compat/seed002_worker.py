"""Seed 002's ``QueueWorker``: a conveyor :class:`~conveyor.worker.Worker` behind the seed's API.

The seed's worker ran ``max_workers`` polling loops plus a thread pool it could overrun (then it
requeued the job with backoff). Here ``max_workers`` is the async executor's concurrency and
``thread_pool_size`` the thread executor's; the conveyor worker reserves a job only when the
executor that will run it has a free slot, so nothing is fetched just to be put back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from conveyor.compat.seed002_config import QueueConfig
from conveyor.errors import BrokerUnavailable, ConfigurationError

if TYPE_CHECKING:
    from conveyor.metrics import Metrics
    from conveyor.worker.worker import Worker

#: How long stop() may take beyond the grace period (cancelling and releasing the rest).
STOP_MARGIN_S: Final = 5.0
#: Signals a running QueueWorker stops on before handing them to the program's own handlers.
SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class QueueWorker:
    """Runs the operations a :class:`QueueManager` enqueued on the same :class:`QueueConfig`.

    ``await start()`` returns once the worker is consuming (in the background, on the running
    loop); ``await stop()`` is graceful, idempotent and bounded: it stops reserving, lets running
    operations finish for up to ``grace_period_s``, then cancels and releases the rest (they run
    again later, no attempt charged). Ctrl+C (SIGINT) or SIGTERM stops it the same way before the
    program's own handling of the signal goes ahead (see ``install_signals``).

    Args:
        config: the shared configuration.
        max_workers: async operations run at once.
        work_timeout: seconds an operation may run when it is enqueued through this config
            without a timeout and the config has no ``default_timeout`` (the timeout is stored
            with each job when it is enqueued; see :meth:`QueueConfig.timeout_for`).
        thread_pool_size: sync operations run at once (threads).
        queues: conveyor queues to consume besides those the config has enqueued to.
        modules: modules whose public functions jobs may name as processors; imported and
            registered at start (the operator's allow-list: nothing else is ever imported).
        process_pool_size: processes for tasks registered with ``executor="process"``.
        grace_period_s: how long stop() waits for running operations.
        callback_timeout_s: the bound on each on_success / on_failure call.
        install_signals: on SIGINT/SIGTERM while running (main thread only), stop gracefully
            first, then hand the signal to the handler that was there before (so Ctrl+C under
            ``asyncio.run`` still ends the program with KeyboardInterrupt, after the drain);
            a second signal is handed on at once.
    """

    def __init__(
        self,
        config: QueueConfig,
        max_workers: int = 5,
        work_timeout: float = 30.0,
        thread_pool_size: int = 20,
        *,
        queues: Iterable[str] = (),
        modules: Iterable[str] = (),
        process_pool_size: int = 0,
        grace_period_s: float = 10.0,
        callback_timeout_s: float = 10.0,
        install_signals: bool = True,
    ) -> None:
        if max_workers < 1 or thread_pool_size < 1 or process_pool_size < 0:
            raise ConfigurationError(
                "max_workers and thread_pool_size must be >= 1, process_pool_size >= 0"
            )
        if not work_timeout > 0:
            raise ConfigurationError(f"work_timeout must be > 0, got {work_timeout}")
        self.config = config
        self.max_workers = max_workers
        self.work_timeout = work_timeout
        self.thread_pool_size = thread_pool_size
        self.process_pool_size = process_pool_size
        self.grace_period_s = grace_period_s
        self.callback_timeout_s = callback_timeout_s
        self.install_signals = install_signals
        config.work_timeout = work_timeout
        self.modules = list(modules)
        config.track_queues(queues)
        self._worker: Worker | None = None
        self._guard: asyncio.Task[None] | None = None
        self._metrics: Metrics | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._signalled: asyncio.Task[None] | None = None
        self._redelivered = False
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}
        config.add_metrics_source(self)

    def __repr__(self) -> str:
        state = "running" if self.running else "idle"
        return f"<QueueWorker {state} queues={sorted(self.config.queues)}>"

    @property
    def running(self) -> bool:
        """Whether the worker is consuming (started, not stopping, not stopped by a crash)."""
        return self._worker is not None and self._worker.state == "running"

    @property
    def worker(self) -> Worker | None:
        """The conveyor worker (None before start)."""
        return self._worker

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the allowed modules, connect, and start consuming; returns once running."""
        if self._worker is not None:
            return
        for name in self.modules:
            self.config.register_module(importlib.import_module(name))
        # Imported here so that a producer-only process (QueueManager) never loads the worker.
        from conveyor.worker.worker import Worker

        await self._connect()
        concurrency = {"async": self.max_workers, "thread": self.thread_pool_size}
        if self.process_pool_size:
            concurrency["process"] = self.process_pool_size
        # Operations may name new processors of either kind later (a function is registered by
        # its first enqueue), so the executors are named here rather than derived from the tasks.
        worker = Worker(
            self.config.app,
            queues=sorted(self.config.queues),
            concurrency=concurrency,
            executors=[k for k in ("async", "thread", "process") if k in concurrency],
            grace_period_s=self.grace_period_s,
            install_signals=False,
            callback_timeout_s=self.callback_timeout_s,
        )
        await worker.start()
        self._worker = worker
        self._metrics = worker.metrics
        self._stopping = None
        self._guard = asyncio.create_task(self._stop_on_cancel(), name="queue-worker-guard")
        if self.install_signals:
            self._redelivered = False
            self._install_signal_handlers()
        self.config.logger.info(
            "queue worker started on %s (async %d, threads %d)",
            ", ".join(sorted(self.config.queues)),
            self.max_workers,
            self.thread_pool_size,
            extra={"action": "worker_start"},
        )

    async def stop(self) -> None:
        """Stop gracefully (idempotent; bounded by ``grace_period_s`` plus a few seconds)."""
        if self._worker is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._shutdown(), name="queue-worker-stop")
        # Shielded: a caller cancelled while waiting must not abandon the shutdown half-way.
        await asyncio.shield(self._stopping)

    async def _shutdown(self) -> None:
        worker = self._worker
        assert worker is not None
        guard, self._guard = self._guard, None
        if guard is not None and guard is not asyncio.current_task():
            guard.cancel()
        bound = self.grace_period_s + STOP_MARGIN_S
        try:
            async with asyncio.timeout(bound):  # Worker.stop is bounded too; this is a backstop
                await worker.stop()
        except TimeoutError:
            self.config.logger.error("queue worker did not stop within %.1f s", bound)
        finally:
            self._restore_signal_handlers()
            self._worker = None
            self._stopping = None
            self.config.logger.info("queue worker stopped", extra={"action": "worker_stop"})

    async def _stop_on_cancel(self) -> None:
        """Wait; if the loop cancels this task (asyncio.run tearing down), stop the worker."""
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self._stopping is None and self._worker is not None:
                self._guard = None
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.stop())
            raise

    # -- signals ---------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        """Take SIGINT/SIGTERM while running, remembering the handlers to hand them on to."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:  # the program chose to ignore it (nohup, & in sh)
                continue
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # no loop signals here
                continue
            self._previous_handlers[sig] = previous
        self._signal_loop = loop

    def _restore_signal_handlers(self) -> None:
        loop, handlers = self._signal_loop, self._previous_handlers
        while handlers:
            sig, previous = handlers.popitem()
            with contextlib.suppress(Exception):  # the loop is closing: nothing left to restore
                if loop is not None:
                    loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)

    def _on_signal(self, sig: signal.Signals) -> None:
        """First signal: stop gracefully, then hand the signal on; a second: hand it on now."""
        if self._signalled is not None:
            self.config.logger.warning(
                "%s received again: not waiting for running operations", sig.name
            )
            self._redeliver(sig)
            return
        self.config.logger.info(
            "%s received: stopping the queue worker (up to %.1f s for running operations)",
            sig.name,
            self.grace_period_s,
            extra={"action": "signal"},
        )
        self._signalled = asyncio.create_task(self._stop_then_redeliver(sig))

    async def _stop_then_redeliver(self, sig: signal.Signals) -> None:
        try:
            await self.stop()
        finally:
            self._signalled = None
            self._redeliver(sig)

    def _redeliver(self, sig: signal.Signals) -> None:
        """Hand ``sig`` to the program's own handler, once per received signal.

        That handler then does what it always did: under ``asyncio.run`` Ctrl+C cancels main()
        and ends in KeyboardInterrupt; SIGTERM's default ends the process.
        """
        if self._redelivered:
            return
        self._redelivered = True
        self._restore_signal_handlers()
        signal.raise_signal(sig)

    async def _connect(self) -> None:
        """Connect the app, retrying an unavailable broker ``max_connection_retries`` times."""
        pause = 0.5
        retries = self.config.max_connection_retries
        for attempt in range(retries + 1):
            try:
                await self.config.app.connect()
                return
            except BrokerUnavailable:
                if attempt == retries:
                    raise
                self.config.logger.warning(
                    "broker unavailable at start; retry %d/%d in %.1f s",
                    attempt + 1,
                    retries,
                    pause,
                    extra={"action": "reconnect"},
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)

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

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The worker's figures under the seed's metric names (see QueueConfig.get_metrics)."""
        # The last worker's counters stay readable after stop (a status after a drain).
        if self._metrics is None:
            return {}
        return seed_metrics(self._metrics.as_dict(), self.thread_pool_size)

    def health(self) -> dict[str, Any] | None:
        """The conveyor worker's health report (None before start)."""
        return None if self._worker is None else self._worker.health()


def seed_metrics(raw: dict[str, Any], thread_pool_size: int) -> dict[str, Any]:
    """Map a conveyor worker's :meth:`Metrics.as_dict` to the seed's metric names.

    ``processed`` is completed runs, ``failed`` operations moved to dead letters (each failed
    *run* is either retried or dead-lettered). The thread pool never overflows, so instead of
    the seed's exhaustion count there is ``thread_pool_saturated`` (full right now) and
    ``thread_pool_saturated_fetches`` (fetches skipped because it was full).
    """
    totals: dict[str, Any] = raw.get("totals", {})
    thread: dict[str, Any] = raw.get("executors", {}).get("thread", {})
    return {
        "processed": totals.get("completed", 0),
        "failed": totals.get("dead_lettered", 0),
        "retried": totals.get("retried", 0),
        "timeouts": totals.get("timeouts", 0),
        "started": totals.get("started", 0),
        "cancelled": totals.get("cancelled", 0),
        "released": totals.get("released", 0),
        "callback_failures": totals.get("callback_failures", 0),
        "in_progress": raw.get("running", 0),
        "thread_pool_size": int(thread.get("concurrency", thread_pool_size)),
        "thread_pool_busy": int(thread.get("busy", 0)),
        "thread_pool_utilization": round(100.0 * float(thread.get("utilization", 0.0)), 1),
        "thread_pool_saturated": bool(thread.get("saturated", 0.0)),
        "thread_pool_saturated_fetches": int(thread.get("saturated_fetches", 0)),
    }
