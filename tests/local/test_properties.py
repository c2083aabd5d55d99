"""Property-based (stateful) tests: random runs of put/get/start/stop keep BoundedQueue's books.

A hypothesis state machine drives one BoundedQueue on its own event loop through random
sequences of operations, with workers whose handler can be held at a gate (so that stops find
items in flight) and fails on some items. After every step:

- every accepted item is in exactly one place: processed, dropped, discarded, cancelled, still
  queued or in flight (``enqueued == processed + dropped + discarded + cancelled + size +
  in_flight``), and the counters agree with what the handler and ``on_drop`` saw;
- no item is handled twice, and no item is both handled (or taken) and dropped;
- no operation hangs: each step runs under a hard time limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conveyor.local import (
    BoundedQueue,
    OverflowPolicy,
    QueueEmptyError,
    QueueFullError,
    QueueStateError,
    QueueStatus,
)

R = TypeVar("R")

STEP_LIMIT_S = 5.0  # any single operation slower than this is a hang
PUT_TIMEOUT_S = 0.002  # the queue's default wait: keeps block-policy backpressure quick
STOP_SLACK_S = 0.5  # stop() promises timeout + 100 ms; extra room for a loaded machine


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.gate = asyncio.Event()  # the handler waits here while the gate is closed
        self.gate.set()
        self.queue: BoundedQueue[int] | None = None
        self.next_item = 0
        self.accepted: set[int] = set()  # put() returned True / put_nowait() returned
        self.started: list[int] = []  # handler entered
        self.finished: list[int] = []  # handler returned or raised
        self.error_reports: list[int] = []  # error_handler called
        self.taken: list[int] = []  # get()/get_nowait() returned
        self.dropped: list[int] = []  # on_drop called

    # -- harness -----------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        async def bounded() -> R:
            async with asyncio.timeout(STEP_LIMIT_S):
                return await coro

        return self.loop.run_until_complete(bounded())

    def new_item(self) -> int:
        self.next_item += 1
        return self.next_item

    async def handle(self, item: int) -> None:
        self.started.append(item)
        await self.gate.wait()
        if item % 3 == 0:
            await asyncio.sleep(0)  # interleave with the other workers
        self.finished.append(item)
        if item % 5 == 0:
            raise ValueError(item)

    async def report(self, exc: Exception, item: int) -> None:
        assert exc.args == (item,)
        self.error_reports.append(item)

    @property
    def q(self) -> BoundedQueue[int]:
        assert self.queue is not None
        return self.queue

    # -- rules -------------------------------------------------------------------------------

    @initialize(
        overflow=st.sampled_from(list(OverflowPolicy)),
        maxsize=st.integers(1, 4),
        num_workers=st.integers(0, 3),
    )
    def create(self, overflow: OverflowPolicy, maxsize: int, num_workers: int) -> None:
        # Start where the interesting behaviour is: processing, with or without workers.
        self.queue = BoundedQueue(
            maxsize=maxsize,
            timeout=PUT_TIMEOUT_S,
            overflow=overflow,
            grace_period_s=0.05,
            on_drop=self.dropped.append,
        )
        self.run(self.queue.start())
        if num_workers:
            self.run(self.queue.start_workers(self.handle, num_workers, self.report))

    @rule()
    def start(self) -> None:
        self.run(self.q.start())
        assert self.q.status is QueueStatus.PROCESSING

    @rule(num_workers=st.integers(1, 3))
    def start_workers(self, num_workers: int) -> None:
        if self.q.status is QueueStatus.PROCESSING and self.q.worker_count == 0:
            self.run(self.q.start_workers(self.handle, num_workers, self.report))
            assert self.q.worker_count == num_workers
        else:
            with pytest.raises(QueueStateError):
                self.run(self.q.start_workers(self.handle, num_workers, self.report))

    @rule()
    def put(self) -> None:
        item = self.new_item()
        if self.q.status is not QueueStatus.PROCESSING:
            with pytest.raises(QueueStateError):
                self.run(self.q.put(item))
            return
        try:
            accepted = self.run(self.q.put(item))
        except QueueFullError:
            assert self.q.overflow is OverflowPolicy.REJECT
            return
        if accepted:
            self.accepted.add(item)
        else:
            assert self.q.overflow is OverflowPolicy.BLOCK  # only blocking applies backpressure

    @rule(count=st.integers(1, 6))
    def put_nowait(self, count: int) -> None:
        for _ in range(count):
            self.put_one_nowait()

    def put_one_nowait(self) -> None:
        # No loop turn happens here, so the outcome is exactly predictable.
        item = self.new_item()
        queue = self.q
        if queue.status is not QueueStatus.PROCESSING:
            with pytest.raises(QueueStateError):
                queue.put_nowait(item)
            return
        was_full = queue.is_full
        if was_full and queue.overflow in (OverflowPolicy.BLOCK, OverflowPolicy.REJECT):
            with pytest.raises(QueueFullError):
                queue.put_nowait(item)
            return
        drops = len(self.dropped)
        queue.put_nowait(item)
        self.accepted.add(item)
        if not was_full:
            assert len(self.dropped) == drops
        elif queue.overflow is OverflowPolicy.DROP_NEWEST:
            assert self.dropped[drops:] == [item]
        else:
            assert len(self.dropped) == drops + 1
            assert self.dropped[-1] != item

    @rule(wait=st.booleans())
    def get(self, wait: bool) -> None:
        queue = self.q
        if queue.status is not QueueStatus.PROCESSING:
            with pytest.raises(QueueStateError):
                queue.get_nowait()
            return
        try:
            item = self.run(queue.get(timeout=0.001)) if wait else queue.get_nowait()
        except QueueEmptyError:
            assert wait or queue.is_empty
            return
        assert item in self.accepted
        self.taken.append(item)
        queue.task_done()

    @rule(turns=st.integers(1, 5))
    def let_workers_run(self, turns: int) -> None:
        async def yield_turns() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)

        self.run(yield_turns())

    @rule()
    def close_gate(self) -> None:
        self.gate.clear()

    @rule()
    def open_gate(self) -> None:
        self.gate.set()

    @precondition(lambda self: self.gate.is_set())
    @rule()
    def join(self) -> None:
        queue = self.q
        if queue.worker_count == 0 and queue.metrics["size"]:
            return  # nobody to process the backlog: join() would rightly wait for stop()
        self.run(queue.join())
        metrics = queue.metrics
        assert (metrics["size"], metrics["in_flight"]) == (0, 0)

    @rule(drain=st.booleans(), timeout=st.sampled_from([0.0, 0.005, 0.02]))
    def stop(self, drain: bool, timeout: float) -> None:
        queue = self.q
        discarded_before = queue.metrics["discarded"]
        start = time.perf_counter()
        discarded = self.run(queue.stop(timeout, drain=drain))
        elapsed = time.perf_counter() - start
        assert elapsed < timeout + 0.1 + STOP_SLACK_S
        assert queue.status is QueueStatus.STOPPED
        metrics = queue.metrics
        assert (metrics["size"], metrics["in_flight"], queue.worker_count) == (0, 0, 0)
        assert metrics["discarded"] - discarded_before == discarded
        assert not [t for t in asyncio.all_tasks(self.loop) if not t.done()]

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def every_item_is_accounted_for(self) -> None:
        if self.queue is None:
            return
        m = self.queue.metrics
        assert m["enqueued"] == len(self.accepted)
        assert m["enqueued"] == (
            m["processed"]
            + m["dropped"]
            + m["discarded"]
            + m["cancelled"]
            + m["size"]
            + m["in_flight"]
        )
        assert m["processed"] == len(self.finished) + len(self.taken)
        assert m["errors"] == len(self.error_reports) == sum(1 for i in self.finished if i % 5 == 0)
        assert m["dropped"] == len(self.dropped)
        assert 0 <= m["size"] <= self.queue.maxsize
        assert m["high_water_mark"] <= self.queue.maxsize

    @invariant()
    def no_item_has_two_fates(self) -> None:
        started, taken, dropped = set(self.started), set(self.taken), set(self.dropped)
        assert len(started) == len(self.started), "an item was handled twice"
        assert len(taken) == len(self.taken), "an item was taken twice"
        assert len(dropped) == len(self.dropped), "an item was dropped twice"
        assert not started & dropped, "an item was both processed and dropped"
        assert not taken & dropped, "an item was both taken and dropped"
        assert not started & taken, "an item was both processed and taken"
        assert started | taken | dropped <= self.accepted

    def teardown(self) -> None:
        try:
            if self.queue is not None:
                self.gate.set()
                self.run(self.queue.stop(0.05, drain=False))
                assert not [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        finally:
            self.loop.close()


TestBoundedQueueStateMachine = QueueMachine.TestCase
TestBoundedQueueStateMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
