"""Seed 004's job-manager face (conveyor.compat.seed004) with a real worker and spawned children.

The seed's Examples 2-4 (in seed004_jobs.py, verbatim but for their imports) run against the
global manager made by init_global_queue_manager on a SQLite registry; the other tests check
each documented behaviour: stop, delete, logs, health, the limits and their policies, retention,
max_concurrent_jobs, and persistence across restarts. Every async test runs on one event loop
for the module, which the global manager (and its process children) belong to.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import seed004_jobs
from seed004_jobs import (
    ChattyJob,
    DataProcessingJob,
    FailingJob,
    ImpatientJob,
    LimitedJob,
    OtherJob,
    RaisingJob,
    SleepingJob,
    TimedJob,
)

from conveyor.compat import seed004
from conveyor.compat.seed004 import (
    JobBase,
    JobManager,
    JobStatus,
    QueueJobBase,
    QueueManagerIntegration,
    get_global_queue_manager,
    init_global_queue_manager,
    shutdown_global_queue_manager,
)
from conveyor.errors import (
    ConfigurationError,
    InvalidJobError,
    InvalidTransition,
    JobNotFound,
    PayloadError,
    QueueLimitReached,
)
from conveyor.job import FailureReason, JobState

# The seed documents live in shared/ beside the checkout (where this checkout has them).
SEED_GLOB = str(Path(__file__).resolve().parents[3] / "shared" / "seeds" / "004_*.txt")
SEED_IMPORT = "from mcp_proxy_adapter.integrations.queuemgr_integration import"
COMPAT_IMPORT = "from conveyor.compat.seed004 import"
FINISHED = {"completed", "failed", "stopped"}

# One event loop for the module: the global manager's worker lives on it between tests.
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def manager(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[JobManager]:
    """The global manager, as the seed's startup hook makes it, on a persistent registry."""
    registry = tmp_path_factory.mktemp("seed004") / "queue_registry.jsonl"  # the seed's name
    await init_global_queue_manager(
        registry_path=str(registry),
        shutdown_timeout=5.0,
        max_concurrent_jobs=2,
        in_memory=False,
        max_queue_size=None,
        per_job_type_limits=None,
        completed_job_retention_seconds=21600,
    )
    try:
        yield await get_global_queue_manager()
    finally:
        await shutdown_global_queue_manager()


async def wait_status(
    manager: JobManager, job_id: str, wanted: set[str], timeout_s: float = 30.0
) -> JobStatus:
    """Poll the job's status until it is one of ``wanted``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await manager.get_job_status(job_id)
        if status.status in wanted:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} is {status.status}, not {wanted}, after {timeout_s} s")
        await asyncio.sleep(0.05)


async def wait_for_log(manager: JobManager, job_id: str, prefix: str) -> str:
    """Poll the job's stdout until a line starts with ``prefix``; return that line."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in (await manager.get_job_logs(job_id))["stdout"]:
            if line.startswith(prefix):
                return str(line)
        await asyncio.sleep(0.05)
    pytest.fail(f"job {job_id} logged no line starting with {prefix!r}")


async def run_job(manager: JobManager, job_class: type[JobBase], job_id: str, **params: Any) -> Any:
    """Add, start and wait for one job; its final status."""
    await manager.add_job(job_class, job_id, params)
    await manager.start_job(job_id)
    return await wait_status(manager, job_id, FINISHED)


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- the seed's examples -------------------------------------------------------------------------


def test_examples_are_the_seed_snippets_with_only_their_imports_changed() -> None:
    source = Path(seed004_jobs.__file__).read_text()
    region = source.split("# fmt: off\n", 1)[1].split("# --- end of seed 004 examples ---", 1)[0]
    copies = region.split("# --- seed 004 Example ")[1:]
    assert [c.split(" ---\n", 1)[0] for c in copies] == ["2", "3", "4"]
    for seed in glob.glob(SEED_GLOB):  # the seed document, where this checkout has it
        text = Path(seed).read_text()
        for copy in copies:
            number, code = copy.split(" ---\n", 1)
            section = text.split(f"### Example {number}:", 1)[1]
            snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
            assert code == snippet.replace(SEED_IMPORT, COMPAT_IMPORT)


def test_the_seed_names_are_conveyors_plain_ones() -> None:
    assert QueueJobBase is JobBase
    assert QueueManagerIntegration is JobManager
    job = DataProcessingJob("local", {"data": [1, 2]})
    assert job.mcp_params is job.params
    job.set_mcp_error("broken")
    assert (job.status, job.error, job.description) == ("failed", "broken", "broken")
    job.set_mcp_result({"ok": True})  # the last report wins
    assert (job.status, job.result, job.error) == ("completed", {"ok": True}, None)


@module_loop
async def test_examples_3_and_4_run_the_data_processing_job_to_its_result(
    manager: JobManager,
) -> None:
    data = list(range(10))
    job_id = await seed004_jobs.process_data_async(data)
    seen: list[int] = []

    async def watch() -> None:
        while True:
            status = await manager.get_job_status(job_id)
            seen.append(status.progress)
            if status.status in FINISHED:
                return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    result = await seed004_jobs.wait_for_job_completion(job_id, timeout=60)
    await watcher
    assert result == {
        "processed": 10,
        "results": [seed004_jobs.process_item(i) for i in data],
        "status": "completed",
    }
    assert any(0 < p < 100 for p in seen), seen  # progress moved while it ran
    assert seen == sorted(seen)
    status = await manager.get_job_status(job_id)
    assert status.status == "completed"
    assert status.progress == 100
    assert status.description == "Processing item 10/10"
    assert status.error is None
    assert status.job is not None
    assert status.job.task == "seed004_jobs.DataProcessingJob"


@module_loop
async def test_set_error_fails_the_job_with_its_message_without_a_retry(
    manager: JobManager,
) -> None:
    await manager.add_job(FailingJob, "fails", {"path": "/data/x.csv"})
    await manager.start_job("fails")
    # The seed's Example 4 raises on a failed job with its error.
    with pytest.raises(Exception, match=r"^Job failed: cannot process /data/x.csv$"):
        await seed004_jobs.wait_for_job_completion("fails", timeout=60)
    status = await manager.get_job_status("fails")
    assert status.status == "failed"
    assert status.error == "cannot process /data/x.csv"
    assert status.description == "cannot process /data/x.csv"
    assert status.progress == 30
    assert status.result is None
    assert status.job is not None
    assert status.job.attempts == 1
    assert status.job.failure_reason == FailureReason.GAVE_UP


@module_loop
async def test_an_exception_in_run_fails_the_job_and_logs_its_traceback_to_stderr(
    manager: JobManager,
) -> None:
    status = await run_job(manager, RaisingJob, "raises", value="x")
    assert status.status == "failed"
    assert status.error == "ValueError: bad input 'x'"
    logs = await manager.get_job_logs("raises")
    assert logs["stdout"] == []
    assert logs["stderr"][0] == "ERROR seed004_jobs.RaisingJob: job raises (RaisingJob) raised"
    assert "Traceback (most recent call last):" in logs["stderr"]
    assert logs["stderr"][-1] == "ValueError: bad input 'x'"


# -- control -------------------------------------------------------------------------------------


@module_loop
async def test_add_job_holds_the_job_pending_until_start_job(manager: JobManager) -> None:
    added = await manager.add_job(TimedJob, "held", {"seconds": 0})
    assert added.status == "pending"
    await asyncio.sleep(0.3)
    assert (await manager.get_job_status("held")).status == "pending"
    started = await manager.start_job("held")
    assert started.status in ("pending", "running", "completed")  # pending = waiting for a slot
    status = await wait_status(manager, "held", FINISHED)
    assert status.status == "completed"
    assert set(status.result) == {"start", "end", "pid"}
    with pytest.raises(InvalidTransition, match="held is completed"):
        await manager.start_job("held")
    # Stopping a finished job changes nothing.
    assert (await manager.stop_job("held")).status == "completed"


@module_loop
async def test_stop_job_terminates_the_running_child_within_a_second(manager: JobManager) -> None:
    await manager.add_job(SleepingJob, "sleeper", {"seconds": 60})
    await manager.start_job("sleeper")
    await wait_status(manager, "sleeper", {"running"})
    pid = int((await wait_for_log(manager, "sleeper", "pid ")).split()[1])
    started = time.monotonic()
    stopped = await manager.stop_job("sleeper")
    assert stopped.status == "stopped"
    while not process_is_gone(pid):
        assert time.monotonic() - started < 1.5, "the job's process child is still alive"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # a late outcome from the dying child must not change anything
    status = await manager.get_job_status("sleeper")
    assert status.status == "stopped"
    assert status.result is None


@module_loop
async def test_a_job_over_its_timeout_is_stopped_and_fails(manager: JobManager) -> None:
    await manager.add_job(ImpatientJob, "impatient", {"seconds": 60})
    await manager.start_job("impatient")
    pid = int((await wait_for_log(manager, "impatient", "pid ")).split()[1])
    status = await wait_status(manager, "impatient", FINISHED, timeout_s=10)
    assert status.status == "failed"
    assert status.job is not None
    assert status.job.failure_reason == FailureReason.TIMEOUT
    assert "timeout of 0.3 s" in (status.error or "")
    assert process_is_gone(pid)


@module_loop
async def test_delete_job_removes_pending_and_running_jobs(manager: JobManager) -> None:
    await manager.add_job(TimedJob, "to-delete", {})
    deleted = await manager.delete_job("to-delete")
    assert dict(deleted) == {
        "job_id": "to-delete",
        "status": "deleted",
        "result": None,
        "error": None,
        "progress": 0,
        "description": "",
    }
    assert (await manager.get_job_status("to-delete")).status == "deleted"

    await manager.add_job(SleepingJob, "running-delete", {"seconds": 60})
    await manager.start_job("running-delete")
    pid = int((await wait_for_log(manager, "running-delete", "pid ")).split()[1])
    assert (await manager.delete_job("running-delete")).status == "deleted"
    started = time.monotonic()
    while not process_is_gone(pid):
        assert time.monotonic() - started < 1.5, "the deleted job's process child is alive"
        await asyncio.sleep(0.02)
    assert (await manager.get_job_status("running-delete")).status == "deleted"
    ids = {s.job_id for s in await manager.list_jobs()}
    assert not ids & {"to-delete", "running-delete"}
    with pytest.raises(JobNotFound):
        await manager.get_job_logs("running-delete")
    assert (await manager.delete_job("running-delete")).status == "deleted"  # idempotent
    with pytest.raises(JobNotFound):
        await manager.get_job_status("never-added")


# -- reads ---------------------------------------------------------------------------------------


@module_loop
async def test_get_job_logs_splits_printed_lines_from_stderr_and_log_records(
    manager: JobManager,
) -> None:
    status = await run_job(manager, ChattyJob, "chatty")
    assert status.result == "done"
    logs = await manager.get_job_logs("chatty")
    assert logs == {
        "job_id": "chatty",
        "stdout": ["first stdout line", "second stdout line"],
        "stderr": [
            "an error line",
            "INFO seed004_jobs.ChattyJob: a log record",
            "WARNING seed004_jobs.ChattyJob: a warning record",
            "WARNING some.library: a library record",
        ],
        "stdout_lines": 2,
        "stderr_lines": 4,
        "dropped_lines": 0,
    }


@module_loop
async def test_job_status_reads_as_attributes_and_as_the_seeds_dict(manager: JobManager) -> None:
    status = await run_job(manager, TimedJob, "shape", seconds=0)
    assert status["status"] == status.status == "completed"
    assert status["result"] is status.result
    assert list(status) == ["job_id", "status", "result", "error", "progress", "description"]
    assert status == status.to_dict()
    assert status.get("missing") is None
    assert status.state is JobState.COMPLETED
    listed = {s.job_id: s for s in await manager.list_jobs(status="completed")}
    assert listed["shape"] == status
    assert not {s.job_id for s in await manager.list_jobs(status="pending")} & {"shape"}
    with pytest.raises(InvalidJobError, match="unknown status"):
        await manager.list_jobs(status="done")


@module_loop
async def test_the_global_manager_is_one_and_must_be_initialised(manager: JobManager) -> None:
    assert await get_global_queue_manager() is manager
    with pytest.raises(ConfigurationError, match="already initialised"):
        await init_global_queue_manager(in_memory=True)
    saved = seed004._global_manager
    seed004._global_manager = None
    try:
        with pytest.raises(ConfigurationError, match="init_global_queue_manager"):
            await get_global_queue_manager()
        await shutdown_global_queue_manager()  # nothing to shut down: a no-op
    finally:
        seed004._global_manager = saved


# -- input checks --------------------------------------------------------------------------------


class NotAJob:
    def run(self) -> None:
        pass


@module_loop
async def test_bad_input_is_refused_before_any_limit_evicts_anything() -> None:
    class LocalJob(JobBase):
        def run(self) -> None:
            pass

    async with JobManager(max_concurrent_jobs=1, max_queue_size=1) as m:
        await m.add_job(TimedJob, "keep", {})
        with pytest.raises(ConfigurationError, match="subclass of QueueJobBase"):
            await m.add_job(NotAJob, "a", {})  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="module level"):
            await m.add_job(LocalJob, "b", {})
        with pytest.raises(InvalidJobError, match="params must be a dict"):
            await m.add_job(TimedJob, "c", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(PayloadError):
            await m.add_job(TimedJob, "d", {"x": {1, 2}})
        with pytest.raises(InvalidJobError, match="already in use"):
            await m.add_job(TimedJob, "keep", {})
        with pytest.raises(InvalidJobError, match="invalid job id"):
            await m.add_job(TimedJob, "", {})
        assert [s.job_id for s in await m.list_jobs()] == ["keep"]
        assert (await m.get_job_status("keep")).status == "pending"


def test_options_are_checked_when_the_manager_is_built() -> None:
    with pytest.raises(ConfigurationError, match="registry_path"):
        JobManager(in_memory=False)
    with pytest.raises(ConfigurationError, match="max_concurrent_jobs"):
        JobManager(max_concurrent_jobs=0)
    with pytest.raises(ConfigurationError, match="per_job_type_limits"):
        JobManager(per_job_type_limits={"x": 0})
    with pytest.raises(ConfigurationError, match="limit_policy"):
        JobManager(limit_policy="drop")  # type: ignore[arg-type]


def test_a_job_class_runs_in_this_process_without_a_manager() -> None:
    job = DataProcessingJob("local", {"data": [1, 2, 3]})
    job.run()
    assert job.result == {"processed": 3, "results": [2, 4, 6], "status": "completed"}
    assert job.progress == 100
    job.set_progress(250)
    assert job.progress == 100
    job.set_progress(-3)
    assert job.progress == 0
    job.set_description("x" * 5000)
    assert len(job.description) == 1024
    with pytest.raises(ValueError, match="unknown job status"):
        job.set_status("deleted")


# -- limits --------------------------------------------------------------------------------------


@module_loop
async def test_max_queue_size_evicts_the_oldest_unfinished_job() -> None:
    async with JobManager(max_concurrent_jobs=1, max_queue_size=2) as m:
        assert (await run_job(m, TimedJob, "done", seconds=0)).status == "completed"
        await m.add_job(TimedJob, "first", {})
        await m.add_job(TimedJob, "second", {})
        await m.add_job(TimedJob, "third", {})
        assert (await m.get_job_status("first")).status == "deleted"
        assert [s.job_id for s in await m.list_jobs()] == ["third", "second", "done"]
        assert (await m.get_job_status("done")).status == "completed"  # finished jobs stay


@module_loop
async def test_per_job_type_limits_evict_the_oldest_job_of_that_type() -> None:
    async with JobManager(max_concurrent_jobs=1, per_job_type_limits={"limited": 2}) as m:
        await m.add_job(OtherJob, "other-1", {})
        await m.add_job(LimitedJob, "limited-1", {})
        await m.add_job(OtherJob, "other-2", {})
        await m.add_job(LimitedJob, "limited-2", {})
        await m.add_job(LimitedJob, "limited-3", {})
        assert (await m.get_job_status("limited-1")).status == "deleted"
        remaining = [s.job_id for s in await m.list_jobs()]
        assert remaining == ["limited-3", "limited-2", "other-2", "other-1"]


@module_loop
async def test_reject_policy_raises_queue_limit_reached_and_changes_nothing() -> None:
    async with JobManager(
        max_concurrent_jobs=1,
        max_queue_size=2,
        per_job_type_limits={"limited": 1},
        limit_policy="reject",
    ) as m:
        await m.add_job(LimitedJob, "limited-1", {})
        with pytest.raises(QueueLimitReached, match=r"per_job_type_limits\['limited'\] \(1\)"):
            await m.add_job(LimitedJob, "limited-2", {})
        await m.add_job(OtherJob, "other-1", {})
        with pytest.raises(QueueLimitReached, match=r"max_queue_size \(2\) reached"):
            await m.add_job(OtherJob, "other-2", {})
        assert [s.job_id for s in await m.list_jobs()] == ["other-1", "limited-1"]
        with pytest.raises(JobNotFound):
            await m.get_job_status("other-2")


# -- retention, concurrency, health, registries --------------------------------------------------


@module_loop
async def test_retention_removes_old_finished_jobs_only() -> None:
    async with JobManager(max_concurrent_jobs=1, completed_job_retention_seconds=1.2) as m:
        assert m.cleanup_interval_s == pytest.approx(0.2)
        await m.add_job(TimedJob, "pending", {})
        assert (await run_job(m, TimedJob, "completed", seconds=0)).status == "completed"
        assert (await run_job(m, RaisingJob, "failed", value=1)).status == "failed"
        assert await m.cleanup() == 0  # not old enough yet
        deadline = time.monotonic() + 10
        while {s.job_id for s in await m.list_jobs()} != {"pending"}:
            assert time.monotonic() < deadline, "finished jobs were not cleaned up"
            await asyncio.sleep(0.1)
        assert (await m.get_job_status("pending")).status == "pending"
        with pytest.raises(JobNotFound):
            await m.get_job_status("completed")


@module_loop
async def test_max_concurrent_jobs_1_runs_started_jobs_one_after_another() -> None:
    async with JobManager(max_concurrent_jobs=1) as m:
        registry = m.registry_path
        assert registry is not None
        assert os.path.exists(registry)
        for job_id in ("a", "b", "c"):
            await m.add_job(TimedJob, job_id, {"seconds": 0.8})
        await m.start_job("a")
        await m.start_job("b")
        await wait_status(m, "a", {"running"})
        assert (await m.get_job_status("b")).status == "pending"  # waits for the slot
        health = await m.get_queue_health()
        assert health == {
            "status": "healthy",
            "running": True,
            "total_jobs": 3,
            "pending_jobs": 2,
            "running_jobs": 1,
            "completed_jobs": 0,
            "failed_jobs": 0,
            "stopped_jobs": 0,
            "registry_path": registry,
            "max_concurrent_jobs": 1,
        }
        a = await wait_status(m, "a", FINISHED)
        b = await wait_status(m, "b", FINISHED)
        assert a.status == b.status == "completed"
        assert b.result["start"] >= a.result["end"]
        health = await m.get_queue_health()
        assert (health["pending_jobs"], health["completed_jobs"], health["total_jobs"]) == (1, 2, 3)
    assert not os.path.exists(registry)  # in_memory: deleted on shutdown
    assert (await m.get_queue_health())["running"] is False


@module_loop
async def test_a_persistent_registry_keeps_jobs_across_restarts(tmp_path: Path) -> None:
    registry = tmp_path / "registry" / "jobs.db"
    options: dict[str, Any] = {"registry_path": registry, "in_memory": False}
    async with JobManager(max_concurrent_jobs=1, **options) as m:
        await m.add_job(TimedJob, "survivor", {"seconds": 0})
    assert registry.exists()
    async with JobManager(max_concurrent_jobs=1, job_classes=[TimedJob], **options) as m:
        assert (await m.get_job_status("survivor")).status == "pending"
        await m.start_job("survivor")
        assert (await wait_status(m, "survivor", FINISHED)).status == "completed"
