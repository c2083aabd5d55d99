"""Executors with real coroutines, threads, spawned processes and signals (no mocks)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

# tests/worker is not a package: pytest puts it on sys.path, and spawned children inherit
# that sys.path, so they import this module by the same name.
import tasks_for_tests as tasks

from conveyor.context import JobContext, current_context
from conveyor.errors import ConfigurationError
from conveyor.job import Job, new_job_id
from conveyor.task import Task
from conveyor.worker.executors import AsyncExecutor, ThreadExecutor, make_executor
from conveyor.worker.interfaces import (
    ExecutionError,
    JobTimeoutError,
    RemoteError,
    WorkerLostError,
)
from conveyor.worker.process_pool import ProcessExecutor


class Reporter:
    """Collects what a context reports, in order (thread-safe like the worker's reporter)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def report_progress(self, job: Job, progress: int | None, description: str | None) -> None:
        with self._lock:
            self.calls.append(("progress", (progress, description)))

    def report_log(self, job: Job, line: str) -> None:
        with self._lock:
            self.calls.append(("log", line))

    @property
    def lines(self) -> list[str]:
        return [value for kind, value in self.calls if kind == "log"]


def make_ctx(task: Task[Any, Any], *args: Any, **kwargs: Any) -> tuple[JobContext, Reporter]:
    reporter = Reporter()
    job = Job(id=new_job_id(), task=task.name, args=list(args), kwargs=kwargs)
    return JobContext(job, reporter), reporter


# -- common -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "thread", "process"])
@pytest.mark.parametrize("concurrency", [0, -1, 1.5, True])
def test_concurrency_below_one_is_a_configuration_error(kind: str, concurrency: Any) -> None:
    with pytest.raises(ConfigurationError, match="concurrency must be an integer >= 1"):
        make_executor(kind, concurrency)


def test_unknown_kind_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="executor kind must be"):
        make_executor("fiber", 1)


# -- async ------------------------------------------------------------------------------------


async def test_async_job_returns_its_result() -> None:
    ex = AsyncExecutor(2)
    await ex.start()
    ctx, _ = make_ctx(tasks.async_add, 2, b=3)
    assert await ex.run(tasks.async_add, ctx, None) == 5
    assert ex.free_slots == 2
    await ex.shutdown(1)


async def test_async_timeout_raises_job_timeout_and_sets_cancelled() -> None:
    ex = AsyncExecutor(1)
    await ex.start()
    ctx, reporter = make_ctx(tasks.async_sleep, 10)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(JobTimeoutError, match=r"timeout of 0\.05 s"):
        await ex.run(tasks.async_sleep, ctx, 0.05)
    assert loop.time() - t0 < 1
    assert ctx.cancelled
    assert reporter.lines == ["cancelled=True"]  # the coroutine's finally saw the flag
    assert ex.free_slots == 1


async def test_async_tasks_own_timeout_error_is_not_a_job_timeout() -> None:
    ex = AsyncExecutor(1)
    await ex.start()
    ctx, _ = make_ctx(tasks.async_raise_timeout)
    with pytest.raises(TimeoutError) as info:
        await ex.run(tasks.async_raise_timeout, ctx, 5)
    assert not isinstance(info.value, JobTimeoutError)
    assert not ctx.cancelled


async def test_async_cancel_propagates_and_frees_the_slot() -> None:
    ex = AsyncExecutor(1)
    await ex.start()
    ctx, _ = make_ctx(tasks.async_sleep, 10)
    job = asyncio.create_task(ex.run(tasks.async_sleep, ctx, None))
    await asyncio.sleep(0.01)
    assert ex.free_slots == 0
    job.cancel()
    async with asyncio.timeout(1):
        with pytest.raises(asyncio.CancelledError):
            await job
    assert ctx.cancelled
    assert ex.free_slots == 1


async def test_async_run_sets_current_context_only_while_running() -> None:
    seen: list[JobContext | None] = []

    async def probe(ctx: JobContext) -> None:
        seen.append(current_context.get())

    task = tasks.app.task(name="tests.async_probe")(probe)
    ex = AsyncExecutor(1)
    await ex.start()
    ctx, _ = make_ctx(task)
    await ex.run(task, ctx, None)
    assert seen == [ctx]
    assert current_context.get() is None


async def test_async_oversubscription_and_lifecycle_errors_are_runtime_errors() -> None:
    ex = AsyncExecutor(1)
    ctx, _ = make_ctx(tasks.async_sleep, 10)
    with pytest.raises(RuntimeError, match="not started"):
        await ex.run(tasks.async_sleep, ctx, None)
    await ex.start()
    first = asyncio.create_task(ex.run(tasks.async_sleep, ctx, None))
    await asyncio.sleep(0)
    assert ex.free_slots == 0
    with pytest.raises(RuntimeError, match="full"):
        await ex.run(tasks.async_sleep, make_ctx(tasks.async_sleep, 10)[0], None)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await ex.shutdown(1)
    await ex.shutdown(1)  # idempotent
    assert ex.free_slots == 0
    with pytest.raises(RuntimeError, match="shut down"):
        await ex.run(tasks.async_add, make_ctx(tasks.async_add, 1, 2)[0], None)


# -- thread -----------------------------------------------------------------------------------


@pytest.fixture
async def thread_ex() -> AsyncIterator[ThreadExecutor]:
    ex = ThreadExecutor(2)
    await ex.start()
    try:
        yield ex
    finally:
        async with asyncio.timeout(5):
            await ex.shutdown(2)


async def test_thread_job_returns_its_result_from_a_pool_thread(thread_ex: ThreadExecutor) -> None:
    ctx, _ = make_ctx(tasks.thread_add, 2, b=5)
    result = await thread_ex.run(tasks.thread_add, ctx, 5)
    assert result["sum"] == 7
    assert result["thread"].startswith("conveyor-thread-")
    assert result["thread"] != threading.current_thread().name


async def test_thread_job_exception_is_raised_with_its_traceback(
    thread_ex: ThreadExecutor,
) -> None:
    ctx, _ = make_ctx(tasks.thread_raise, "missing")
    with pytest.raises(KeyError, match="missing") as info:
        await thread_ex.run(tasks.thread_raise, ctx, 5)
    assert "thread_raise" in "".join(traceback.format_tb(info.value.__traceback__))
    assert thread_ex.free_slots == 2


async def test_thread_job_raising_system_exit_fails_only_the_job(
    thread_ex: ThreadExecutor,
) -> None:
    ctx, _ = make_ctx(tasks.thread_exit)
    with pytest.raises(ExecutionError, match="SystemExit") as info:
        await thread_ex.run(tasks.thread_exit, ctx, 5)
    assert isinstance(info.value.__cause__, SystemExit)
    ctx, _ = make_ctx(tasks.thread_add, 1)
    assert (await thread_ex.run(tasks.thread_add, ctx, 5))["sum"] == 1


async def test_thread_timeout_fails_at_once_abandons_the_thread_and_restores_capacity(
    thread_ex: ThreadExecutor,
) -> None:
    release = threading.Event()
    ctx, _ = make_ctx(tasks.thread_block, release, 30)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(JobTimeoutError):
        await thread_ex.run(tasks.thread_block, ctx, 0.1)
    assert loop.time() - t0 < 0.5  # did not wait for the stuck call
    assert ctx.cancelled
    assert thread_ex.abandoned == 1
    assert thread_ex.abandoned_running == 1
    assert thread_ex.threads == 2  # a fresh thread replaced the abandoned one
    assert thread_ex.free_slots == 2
    # both slots really run jobs while the abandoned thread is still stuck
    ctxs = [make_ctx(tasks.thread_add, i)[0] for i in range(2)]
    async with asyncio.timeout(5):
        results = await asyncio.gather(*(thread_ex.run(tasks.thread_add, c, 5) for c in ctxs))
    assert [r["sum"] for r in results] == [0, 1]
    release.set()  # the abandoned call returns; its thread exits instead of rejoining the pool
    async with asyncio.timeout(5):
        while thread_ex.abandoned_running:
            await asyncio.sleep(0.01)
    assert thread_ex.threads == 2


async def test_thread_job_sees_cancelled_after_a_timeout(thread_ex: ThreadExecutor) -> None:
    seen: list[bool] = []
    ctx, _ = make_ctx(tasks.thread_wait_cancel, seen, 10)
    with pytest.raises(JobTimeoutError):
        await thread_ex.run(tasks.thread_wait_cancel, ctx, 0.05)
    async with asyncio.timeout(5):
        while not seen:
            await asyncio.sleep(0.01)
    assert seen == [True]  # the thread woke from ctx.wait_cancelled() because of the timeout


async def test_thread_cancel_sets_cancelled_and_reraises(thread_ex: ThreadExecutor) -> None:
    seen: list[bool] = []
    ctx, _ = make_ctx(tasks.thread_wait_cancel, seen, 10)
    job = asyncio.create_task(thread_ex.run(tasks.thread_wait_cancel, ctx, None))
    await asyncio.sleep(0.05)
    assert thread_ex.free_slots == 1
    job.cancel()
    async with asyncio.timeout(1):
        with pytest.raises(asyncio.CancelledError):
            await job
    assert ctx.cancelled
    assert thread_ex.free_slots == 2
    async with asyncio.timeout(5):
        while not seen:
            await asyncio.sleep(0.01)
    assert seen == [True]
    assert thread_ex.abandoned == 1


async def test_thread_free_slots_and_oversubscription(thread_ex: ThreadExecutor) -> None:
    releases = [threading.Event(), threading.Event()]
    jobs = [
        asyncio.create_task(
            thread_ex.run(tasks.thread_block, make_ctx(tasks.thread_block, ev, 10)[0], 10)
        )
        for ev in releases
    ]
    await asyncio.sleep(0)
    assert thread_ex.free_slots == 0
    assert thread_ex.running == 2
    with pytest.raises(RuntimeError, match="reserve at most free_slots"):
        await thread_ex.run(tasks.thread_add, make_ctx(tasks.thread_add, 1)[0], 5)
    releases[0].set()
    async with asyncio.timeout(5):
        await jobs[0]
    assert thread_ex.free_slots == 1
    releases[1].set()
    async with asyncio.timeout(5):
        await jobs[1]
    assert thread_ex.free_slots == 2
    assert thread_ex.abandoned == 0


async def test_thread_shutdown_is_bounded_with_a_stuck_job() -> None:
    ex = ThreadExecutor(1)
    await ex.start()
    release = threading.Event()
    ctx, _ = make_ctx(tasks.thread_block, release, 30)
    job = asyncio.create_task(ex.run(tasks.thread_block, ctx, None))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(3):
        await ex.shutdown(0.3)
    assert loop.time() - t0 < 1
    with pytest.raises(WorkerLostError, match="still running"):
        async with asyncio.timeout(1):
            await job
    assert ctx.cancelled
    assert ex.abandoned == 1
    assert ex.free_slots == 0
    await ex.shutdown(0.3)  # idempotent
    release.set()


async def test_thread_shutdown_stops_idle_threads_promptly() -> None:
    ex = ThreadExecutor(3, name_prefix="idle-pool")
    await ex.start()
    assert ex.threads == 3
    async with asyncio.timeout(2):
        await ex.shutdown(1)
    assert ex.threads == 0
    for t in threading.enumerate():
        if t.name.startswith("idle-pool"):
            t.join(1)  # it has signalled its exit and is returning from its run()
            assert not t.is_alive()


async def test_thread_run_sets_current_context_in_the_thread(thread_ex: ThreadExecutor) -> None:
    seen: list[JobContext | None] = []

    def probe(ctx: JobContext) -> None:
        seen.append(current_context.get())

    task = tasks.app.task(name="tests.thread_probe", executor="thread")(probe)
    ctx, _ = make_ctx(task)
    await thread_ex.run(task, ctx, 5)
    assert seen == [ctx]
    assert current_context.get() is None


# -- process ----------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` exists (a reaped child does not; an unreaped zombie would)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., Awaitable[ProcessExecutor]]]:
    """Started process pools that are shut down (and checked for orphans) after the test."""
    pools: list[ProcessExecutor] = []
    seen: set[int] = set()

    async def make(concurrency: int = 1, **options: Any) -> ProcessExecutor:
        pool = ProcessExecutor(concurrency, **options)
        pools.append(pool)
        async with asyncio.timeout(30):
            await pool.start()
        seen.update(pool.pids)
        return pool

    yield make
    for pool in pools:
        seen.update(pool.pids)
        async with asyncio.timeout(10):
            await pool.shutdown(3)
        assert pool.pids == []
    assert [pid for pid in seen if alive(pid)] == []


async def test_process_job_returns_its_result_from_a_child(make_pool: Any) -> None:
    pool = await make_pool(2)
    assert pool.free_slots == 2
    assert len(pool.pids) == 2
    ctx, _ = make_ctx(tasks.proc_pid, {"nested": [1, 2.5, None, "x"]})
    async with asyncio.timeout(10):
        result = await pool.run(tasks.proc_pid, ctx, 10)
    assert result == {
        "pid": result["pid"],
        "value": {"nested": [1, 2.5, None, "x"]},
        "job": ctx.job_id,
    }
    assert result["pid"] in pool.pids
    assert result["pid"] != os.getpid()
    assert pool.free_slots == 2


async def test_children_run_at_a_lower_cpu_priority_and_so_do_their_replacements(
    make_pool: Any,
) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    pool = await make_pool(2)
    assert pool.nice == 10
    expected = min(19, mine + 10)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.pids] == [expected, expected]
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: len(pool.pids) == 2 and victim not in pool.pids, 15)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.pids] == [expected, expected]
    same = await make_pool(1, nice=0)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in same.pids] == [mine]


@pytest.mark.parametrize("nice", [-1, 20, 2.5, True, "10"])
def test_a_nice_outside_0_to_19_is_a_configuration_error(nice: Any) -> None:
    with pytest.raises(ConfigurationError, match="nice must be an integer from 0"):
        ProcessExecutor(1, nice=nice)


async def test_process_runs_coroutines_nested_and_undecorated_functions(make_pool: Any) -> None:
    pool = await make_pool(1)
    async with asyncio.timeout(10):
        assert await pool.run(tasks.proc_async, make_ctx(tasks.proc_async, 21)[0], 10) == 42
        assert await pool.run(tasks.nested_double, make_ctx(tasks.nested_double, 4)[0], 10) == 8
        assert await pool.run(tasks.plain_task, make_ctx(tasks.plain_task, 4)[0], 10) == 5


async def test_process_exception_is_a_remote_error_with_type_and_traceback(
    make_pool: Any,
) -> None:
    pool = await make_pool(1)
    pid = pool.pids[0]
    ctx, _ = make_ctx(tasks.proc_raise, "bad input")
    with pytest.raises(RemoteError, match="ValueError: bad input") as info:
        async with asyncio.timeout(10):
            await pool.run(tasks.proc_raise, ctx, 10)
    assert info.value.remote_type == "ValueError"
    assert "in proc_raise" in info.value.remote_traceback
    assert info.value.remote_traceback.rstrip().endswith("ValueError: bad input")
    assert pool.pids == [pid]  # an exception does not cost the child
    assert pool.free_slots == 1


async def test_process_unencodable_result_is_a_remote_error(make_pool: Any) -> None:
    pool = await make_pool(1)
    with pytest.raises(RemoteError) as info:
        async with asyncio.timeout(10):
            await pool.run(tasks.proc_unencodable, make_ctx(tasks.proc_unencodable)[0], 10)
    assert info.value.remote_type == "conveyor.errors.UnencodablePayloadError"
    assert "builtins.set has no JSON form" in str(info.value)


async def test_process_timeout_kills_the_child_and_the_pool_replaces_it(
    make_pool: Any,
) -> None:
    pool = await make_pool(1)
    (old_pid,) = pool.pids
    ctx, _ = make_ctx(tasks.proc_sleep, 30)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(JobTimeoutError):
        async with asyncio.timeout(10):
            await pool.run(tasks.proc_sleep, ctx, 0.3)
    assert loop.time() - t0 < 1.5  # 0.3 s timeout + SIGTERM, not the 30 s sleep
    assert ctx.cancelled
    assert not alive(old_pid)  # run() returned only once the child was dead and reaped
    # The slot counts as free at once (the fetcher re-checks only when a run ends); a job
    # started now waits for the replacement child instead of failing.
    assert pool.free_slots == 1
    assert pool.idle == 0
    (new_pid,) = pool.pids
    assert new_pid != old_pid
    ctx, _ = make_ctx(tasks.proc_pid, 1)
    async with asyncio.timeout(10):
        assert (await pool.run(tasks.proc_pid, ctx, 10))["pid"] == new_pid


async def test_cancelling_a_process_job_kills_its_child_within_a_second(make_pool: Any) -> None:
    pool = await make_pool(1)
    (pid,) = pool.pids
    ctx, _ = make_ctx(tasks.proc_sleep, 30)
    job = asyncio.create_task(pool.run(tasks.proc_sleep, ctx, None))
    await wait_until(lambda: pool.pid_of(ctx.job_id) == pid)
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await job
    assert loop.time() - t0 < 1
    assert not alive(pid)
    assert ctx.cancelled
    await wait_until(lambda: pool.idle == 1, timeout_s=10)


async def test_a_child_exiting_fails_only_its_own_job(make_pool: Any) -> None:
    pool = await make_pool(2)
    slow_ctx, _ = make_ctx(tasks.proc_sleep, 0.5)
    slow = asyncio.create_task(pool.run(tasks.proc_sleep, slow_ctx, 10))
    await asyncio.sleep(0)
    ctx, _ = make_ctx(tasks.proc_exit, 3)
    with pytest.raises(WorkerLostError, match="exited with code 3"):
        async with asyncio.timeout(10):
            await pool.run(tasks.proc_exit, ctx, 10)
    async with asyncio.timeout(10):
        assert await slow == "slept"  # the other child's job was unaffected
    await wait_until(lambda: pool.idle == 2, timeout_s=10)
    assert len(pool.pids) == 2


async def test_sigkill_of_a_busy_child_is_worker_lost_and_the_slot_comes_back(
    make_pool: Any,
) -> None:
    pool = await make_pool(2)
    ctxs = [make_ctx(tasks.proc_sleep, s)[0] for s in (30, 0.6)]
    victim, survivor = (asyncio.create_task(pool.run(tasks.proc_sleep, c, 20)) for c in ctxs)
    await wait_until(lambda: pool.pid_of(ctxs[0].job_id) is not None)
    pid = pool.pid_of(ctxs[0].job_id)
    assert pid is not None
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError, match=r"killed by SIGKILL \(signal 9\)"):
        async with asyncio.timeout(5):
            await victim
    async with asyncio.timeout(5):
        assert await survivor == "slept"
    await wait_until(lambda: pool.idle == 2, timeout_s=10)
    assert loop.time() - t0 < 2  # K4: pool back to full size within 2 s
    assert pid not in pool.pids


async def test_child_progress_logs_and_output_reach_the_reporter_in_order(
    make_pool: Any,
) -> None:
    pool = await make_pool(1)
    ctx, reporter = make_ctx(tasks.proc_report)
    async with asyncio.timeout(10):
        assert await pool.run(tasks.proc_report, ctx, 10) == "reported"
    assert reporter.calls == [
        ("progress", (10, "starting")),
        ("log", "line one"),
        ("log", "ctx log"),
        ("log", "partial line two"),
        ("log", "[stderr] to stderr"),
        ("log", "INFO child.logger: logged 42"),
        ("progress", (100, None)),
        ("log", "no newline at the end"),
    ]


async def test_a_child_ignoring_sigterm_is_sigkilled_after_the_grace(make_pool: Any) -> None:
    pool = await make_pool(1, term_grace_s=0.5)
    (pid,) = pool.pids
    ctx, _ = make_ctx(tasks.proc_stubborn, 60)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(JobTimeoutError):
        async with asyncio.timeout(10):
            await pool.run(tasks.proc_stubborn, ctx, 0.3)
    elapsed = loop.time() - t0
    assert 0.3 + 0.5 <= elapsed < 2.5  # timeout, SIGTERM ignored for the grace, then SIGKILL
    assert not alive(pid)
    await wait_until(lambda: pool.idle == 1, timeout_s=10)


async def test_process_free_slots_and_oversubscription(make_pool: Any) -> None:
    pool = await make_pool(1)
    ctx, _ = make_ctx(tasks.proc_sleep, 0.3)
    job = asyncio.create_task(pool.run(tasks.proc_sleep, ctx, 10))
    await asyncio.sleep(0)
    assert pool.free_slots == 0
    with pytest.raises(RuntimeError, match="reserve at most free_slots"):
        await pool.run(tasks.proc_pid, make_ctx(tasks.proc_pid, 1)[0], 10)
    async with asyncio.timeout(10):
        await job
    assert pool.free_slots == 1


async def test_process_shutdown_is_bounded_and_leaves_no_children(make_pool: Any) -> None:
    pool = await make_pool(2)
    pids = pool.pids
    ctx, _ = make_ctx(tasks.proc_stubborn, 60)
    job = asyncio.create_task(pool.run(tasks.proc_stubborn, ctx, None))
    await wait_until(lambda: pool.pid_of(ctx.job_id) is not None)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(10):
        await pool.shutdown(2)
    assert loop.time() - t0 < 3
    assert [pid for pid in pids if alive(pid)] == []
    assert pool.pids == []
    with pytest.raises(WorkerLostError, match="SIGKILL"):
        async with asyncio.timeout(1):
            await job
    await pool.shutdown(2)  # idempotent
    assert pool.free_slots == 0


async def test_process_shutdown_of_idle_children_is_quick(make_pool: Any) -> None:
    pool = await make_pool(2)
    pids = pool.pids
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(5):
        await pool.shutdown(5)
    assert loop.time() - t0 < 1  # they obeyed the stop message; nothing was killed
    assert [pid for pid in pids if alive(pid)] == []


async def test_a_child_that_cannot_start_fails_start_with_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = ProcessExecutor(1, preload=["no_such_module_for_conveyor_tests"])
    with pytest.raises(WorkerLostError, match="exited with code 1 before it was ready"):
        async with asyncio.timeout(30):
            await pool.start()
    assert "No module named 'no_such_module_for_conveyor_tests'" in caplog.text
    assert pool.pids == []


async def test_a_function_defined_in_a_function_is_refused_before_it_reaches_a_child(
    make_pool: Any,
) -> None:
    def local(x: int) -> int:
        return x

    pool = await make_pool(1)
    task: Task[Any, Any] = Task(tasks.app, local, "tests.local", tasks.proc_pid.options)
    with pytest.raises(ConfigurationError, match="module-level function"):
        await pool.run(task, make_ctx(task, 1)[0], 5)
    assert pool.free_slots == 1


PARENT_SCRIPT = """
import asyncio, os, sys
sys.path[:0] = {path!r}
import tasks_for_tests as tasks
from conveyor.context import JobContext
from conveyor.job import Job
from conveyor.worker.executors import ProcessExecutor, ThreadExecutor

class Reporter:
    def report_progress(self, job, progress, description): pass
    def report_log(self, job, line): pass

async def main():
    pool = ProcessExecutor(2)
    await pool.start()
    threads = ThreadExecutor(1)
    await threads.start()
    ctx = JobContext(Job(id="stuck", task="t", args=[60]), Reporter())
    job = asyncio.ensure_future(pool.run(tasks.proc_stubborn, ctx, None))
    import threading
    never = threading.Event()
    tctx = JobContext(Job(id="t", task="t", args=[never, 600]), Reporter())
    tjob = asyncio.ensure_future(threads.run(tasks.thread_block, tctx, None))
    await asyncio.sleep(0.5)
    print(" ".join(map(str, pool.pids)), flush=True)
    if {crash!r}:
        os._exit(0)  # die without shutting anything down

if __name__ == "__main__":
    # Leave with the jobs still running and nothing shut down or cancelled (no asyncio.run
    # cleanup): the atexit hook must kill the busy child, and the stuck daemon thread must not
    # hold the exit.
    asyncio.new_event_loop().run_until_complete(main())
"""


@pytest.mark.parametrize("crash", [True, False], ids=["parent_crashes", "parent_exits"])
def test_children_die_with_their_parent_and_nothing_holds_its_exit(
    tmp_path: Path, crash: bool
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(path=sys.path, crash=crash))
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 15  # no hang on a stuck thread or a child ignoring SIGTERM
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if alive(p)] == []
