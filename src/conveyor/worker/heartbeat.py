"""The heartbeat that renews the leases of a worker's jobs, and the loop monitor it reads.

Why a thread: a job that blocks the event loop (``time.sleep`` in an ``async def``, a long C call)
would stop an in-loop heartbeat, its leases would expire and another worker would run the job a
second time while the first is still at it. So, for brokers shared between processes (SQLite,
Redis), the heartbeat runs in a dedicated thread with its own event loop and its own broker
connection (``open_broker(app.url, clock=app.broker.clock)``); it needs the GIL only for a
moment every ``heartbeat_s``, which even a GIL-holding job yields at the switch interval.

The memory broker lives on the worker's loop and cannot be reached from another loop, so there the
heartbeat is an ordinary task on the main loop (and a blocked loop blocks everything anyway:
nobody else can see the lease expire).

A lease reported as no longer held is handed to the main loop (``on_lost``), which stops the run
(see :meth:`conveyor.worker.leases.HeldJobs.leases_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from conveyor.brokers import open_broker
from conveyor.errors import BrokerReadOnly, BrokerUnavailable, ConveyorError
from conveyor.job import Lease
from conveyor.worker.circuit import Circuit

if TYPE_CHECKING:
    from conveyor.brokers.base import Broker
    from conveyor.client import Conveyor

logger = logging.getLogger(__name__)

#: A main-loop tick older than this is reported as a blocked loop (once per block).
LAG_WARN_S: Final = 1.0
TICK_S: Final = 0.1
#: How long stopping the heartbeat may take (its last broker call is bounded by this too).
STOP_TIMEOUT_S: Final = 2.0


class LoopMonitor:
    """Measures the main loop's lag with a ticking task; a thread can tell that it is blocked.

    ``lag_s`` is the latest lateness of a tick; ``blocked_for_s()`` (callable from any thread) is
    how long the loop has not ticked beyond the tick period.
    """

    def __init__(self) -> None:
        self.lag_s = 0.0
        self.max_lag_s = 0.0
        self.last_tick = time.monotonic()

    async def run(self) -> None:
        """Tick forever (until cancelled)."""
        while True:
            before = time.monotonic()
            self.last_tick = before
            await asyncio.sleep(TICK_S)
            self.lag_s = max(0.0, time.monotonic() - before - TICK_S)
            if self.lag_s > self.max_lag_s:
                self.max_lag_s = self.lag_s

    def blocked_for_s(self) -> float:
        """Seconds the loop has been stuck (0 when it ticks on time)."""
        return max(0.0, time.monotonic() - self.last_tick - TICK_S)


class Heartbeat:
    """Renews the leases of all active jobs every ``heartbeat_s``, batched per queue.

    Args:
        broker: the app's broker (used directly when ``broker_factory`` is None).
        broker_factory: builds the heartbeat's own broker; given, the heartbeat runs in a thread.
        leases: returns the leases to renew (called from the heartbeat's thread: it must only
            copy plain data).
        on_lost: called on the main loop with the leases that are no longer held.
        lease_s: the lease length each renewal sets.
        heartbeat_s: the period.
        monitor: the main loop's lag monitor (the thread warns while the loop is blocked).
        worker_id: for log lines.
    """

    def __init__(
        self,
        *,
        broker: Broker,
        broker_factory: Callable[[], Broker] | None,
        leases: Callable[[], list[Lease]],
        on_lost: Callable[[list[Lease]], None],
        lease_s: float,
        heartbeat_s: float,
        monitor: LoopMonitor | None = None,
        worker_id: str = "",
    ) -> None:
        self._broker = broker
        self._factory = broker_factory
        self._leases = leases
        self._on_lost = on_lost
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self._monitor = monitor
        self.worker_id = worker_id
        self.circuit = Circuit("heartbeat", worker_id)
        self.last_beat_ms = 0
        self._stop_flag = threading.Event()
        self._lock = threading.Lock()
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread_stop: asyncio.Event | None = None
        self._main_stop = asyncio.Event()
        self._thread: threading.Thread | None = None

    @property
    def threaded(self) -> bool:
        """Whether the heartbeat runs in its own thread."""
        return self._factory is not None

    def stop(self) -> None:
        """Ask the heartbeat to stop after its current beat (idempotent, any thread)."""
        self._stop_flag.set()
        self._main_stop.set()
        with self._lock:
            loop, event = self._thread_loop, self._thread_stop
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the thread's loop already closed
                loop.call_soon_threadsafe(event.set)

    async def run(self) -> None:
        """Beat until :meth:`stop`; in thread mode, start the thread and wait for it to end."""
        if self._factory is None:
            await self._beat(self._broker, self._on_lost, self._main_stop, connect=False)
            return
        main_loop = asyncio.get_running_loop()
        done: asyncio.Future[BaseException | None] = main_loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main,
            args=(main_loop, done),
            name=f"conveyor-heartbeat-{self.worker_id}",
            daemon=True,  # never let a stuck heartbeat keep the process alive
        )
        self._thread.start()
        try:
            error = await asyncio.shield(done)
        except asyncio.CancelledError:
            # The owner gave up waiting: the daemon thread finishes its current (bounded) call
            # and exits on its own.
            self.stop()
            raise
        if error is not None:
            raise error

    # -- thread ----------------------------------------------------------------------------------

    def _thread_main(
        self, main_loop: asyncio.AbstractEventLoop, done: asyncio.Future[BaseException | None]
    ) -> None:
        error: BaseException | None = None
        try:
            asyncio.run(self._thread_async(main_loop))
        except BaseException as exc:  # reported to the owner, which stops loudly
            error = exc
        with contextlib.suppress(RuntimeError):  # the main loop is already closed
            main_loop.call_soon_threadsafe(_resolve, done, error)

    async def _thread_async(self, main_loop: asyncio.AbstractEventLoop) -> None:
        stop = asyncio.Event()
        with self._lock:
            self._thread_loop = asyncio.get_running_loop()
            self._thread_stop = stop
        if self._stop_flag.is_set():
            return
        assert self._factory is not None
        broker = self._factory()

        def deliver(lost: list[Lease]) -> None:
            main_loop.call_soon_threadsafe(self._on_lost, lost)

        try:
            await self._beat(broker, deliver, stop, connect=True)
        finally:
            # The heartbeat's connection is the worker's own: it closes it (bounded).
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await broker.close()

    # -- the beat --------------------------------------------------------------------------------

    async def _beat(
        self,
        broker: Broker,
        deliver: Callable[[list[Lease]], None],
        stop: asyncio.Event,
        *,
        connect: bool,
    ) -> None:
        connected = not connect
        warned_block = False
        while not stop.is_set():
            started = time.monotonic()
            delay = self.heartbeat_s
            try:
                if not connected:
                    await broker.connect()
                    connected = True
                leases = self._leases()
                if leases:
                    lost = await self._renew(broker, leases)
                    if lost:
                        deliver(lost)
                self.circuit.success()
                self.last_beat_ms = broker.clock.now_ms()
                delay = max(0.0, self.heartbeat_s - (time.monotonic() - started))
            except (BrokerUnavailable, BrokerReadOnly) as exc:
                # Retry at least every heartbeat: leases are short and every beat counts.
                delay = min(self.circuit.failure(exc), self.heartbeat_s)
            warned_block = self._check_loop(warned_block)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()

    async def _renew(self, broker: Broker, leases: list[Lease]) -> list[Lease]:
        by_queue: dict[str, list[Lease]] = defaultdict(list)
        for lease in leases:
            by_queue[lease.queue].append(lease)
        lost: list[Lease] = []
        for queue_leases in by_queue.values():
            held = await broker.extend_lease(queue_leases, self.lease_s)
            lost.extend(lease for lease, ok in zip(queue_leases, held, strict=True) if not ok)
        return lost

    def _check_loop(self, warned: bool) -> bool:
        """Warn (once per block) when the main loop has stopped ticking; return the new flag."""
        if self._monitor is None or self._factory is None:
            return False
        blocked = self._monitor.blocked_for_s()
        if blocked >= LAG_WARN_S:
            if not warned:
                logger.warning(
                    "worker %s: the event loop has been blocked for %.1f s (a job is running "
                    "blocking code on it; use executor='thread'); leases are still renewed",
                    self.worker_id,
                    blocked,
                    extra={"action": "loop_blocked"},
                )
            return True
        return False


def heartbeat_broker_factory(app: Conveyor, worker_id: str = "") -> Callable[[], Broker] | None:
    """A factory for the heartbeat thread's own broker, or None to beat on the main loop.

    A thread needs a broker other connections can reach (``capabilities.shared``) and a URL
    that really describes the app's broker: an app built with ``broker=`` keeps a default
    ``url``, so the URL is trusted only if a broker built from it has the same settings
    (``options``/``address``). Otherwise the heartbeat runs on the loop, with a warning.
    """
    broker = app.broker
    if not broker.capabilities.shared:
        return None  # memory: one loop, one process; nobody else could see a lease expire
    url, clock = app.url, broker.clock
    try:
        candidate: Broker | None = open_broker(url)
    except ConveyorError:
        candidate = None
    if candidate is None or not all(
        type(candidate) is type(broker)
        and getattr(candidate, attr, None) == getattr(broker, attr, None)
        for attr in ("options", "address")
    ):
        logger.warning(
            "worker %s: app.url (%s) does not describe the app's broker, so leases are "
            "renewed on the event loop; a job blocking the loop may then be re-delivered. "
            "Build the app with Conveyor(url) to renew them from a thread",
            worker_id,
            url,
            extra={"action": "worker_start"},
        )
        return None
    return lambda: open_broker(url, clock=clock)


def _resolve(done: asyncio.Future[Any], error: BaseException | None) -> None:
    if not done.done():
        done.set_result(error)


__all__ = ["Heartbeat", "LoopMonitor", "heartbeat_broker_factory"]
