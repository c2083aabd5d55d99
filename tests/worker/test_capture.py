"""Log capture: records emitted inside a job land in its log, attributed by the context variable."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

# tests/worker is not a package: pytest puts it on sys.path, and spawned children inherit
# that sys.path, so they import this module by the same name.
import tasks_for_tests as tasks

from conveyor.context import JobContext, current_context
from conveyor.job import Job, new_job_id
from conveyor.worker.capture import install_capture
from conveyor.worker.executors import AsyncExecutor, ThreadExecutor


class Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def report_progress(self, job: Job, progress: int | None, description: str | None) -> None:
        pass

    def report_log(self, job: Job, line: str) -> None:
        with self._lock:
            self.lines.append(line)


class LoggingReporter(Reporter):
    """A reporter that itself logs, as a careless one might: it must not loop back into capture."""

    def report_log(self, job: Job, line: str) -> None:
        logging.getLogger("reporter").info("storing %r", line)
        super().report_log(job, line)


def make_ctx(reporter: Reporter, *args: Any) -> JobContext:
    return JobContext(Job(id=new_job_id(), task="t", args=list(args)), reporter)


@pytest.fixture
def capture() -> Iterator[None]:
    uninstall = install_capture()
    try:
        yield
    finally:
        uninstall()


def test_install_lowers_root_level_and_uninstall_restores_it() -> None:
    root = logging.getLogger()
    before = root.level, list(root.handlers)
    uninstall = install_capture(logging.INFO)
    assert root.getEffectiveLevel() <= logging.INFO
    assert len(root.handlers) == len(before[1]) + 1
    uninstall()
    uninstall()  # idempotent
    assert (root.level, list(root.handlers)) == before


@pytest.mark.usefixtures("capture")
def test_records_outside_a_job_and_conveyor_records_are_not_captured() -> None:
    reporter = Reporter()
    ctx = make_ctx(reporter)
    logging.getLogger("x").warning("before the job")
    token = current_context.set(ctx)
    try:
        logging.getLogger("x").info("inside %s", "the job")
        logging.getLogger("conveyor.worker").warning("the worker's own record")
        logging.getLogger("conveyorbelt").info("not ours, captured")
    finally:
        current_context.reset(token)
    logging.getLogger("x").warning("after the job")
    assert reporter.lines == ["INFO x: inside the job", "INFO conveyorbelt: not ours, captured"]


@pytest.mark.usefixtures("capture")
def test_a_reporter_that_logs_does_not_recurse() -> None:
    reporter = LoggingReporter()
    token = current_context.set(make_ctx(reporter))
    try:
        logging.getLogger("x").info("once")
    finally:
        current_context.reset(token)
    assert reporter.lines == ["INFO x: once"]


@pytest.mark.usefixtures("capture")
async def test_logging_inside_an_async_job_lands_in_its_log() -> None:
    ex = AsyncExecutor(1)
    await ex.start()
    reporter = Reporter()
    ctx = JobContext(Job(id=new_job_id(), task=tasks.async_logs.name, args=["there"]), reporter)
    assert await ex.run(tasks.async_logs, ctx, 5) == ctx.job_id
    assert reporter.lines[0] == "INFO x: hello there"
    assert reporter.lines[1].startswith("ERROR x.y: failed\nTraceback (most recent call last):")
    assert reporter.lines[1].endswith("ValueError: boom")
    assert len(reporter.lines) == 2  # the conveyor.* record was not copied


@pytest.mark.usefixtures("capture")
async def test_logging_inside_a_thread_job_lands_in_its_log() -> None:
    ex = ThreadExecutor(2)
    await ex.start()
    try:
        reporters = [Reporter(), Reporter()]
        ctxs = [
            JobContext(Job(id=new_job_id(), task=tasks.thread_logs.name, args=[f"job{i}"]), r)
            for i, r in enumerate(reporters)
        ]
        async with asyncio.timeout(5):
            await asyncio.gather(*(ex.run(tasks.thread_logs, c, 5) for c in ctxs))
        # each record went to the job whose thread emitted it
        assert [r.lines for r in reporters] == [
            ["INFO x: thread says job0"],
            ["INFO x: thread says job1"],
        ]
    finally:
        await ex.shutdown(1)
