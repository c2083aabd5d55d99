"""Seed 002's queue face (conveyor.compat) on real brokers: the private Redis and SQLite files.

The seed's "Basic Usage" example runs as a subprocess with only its import lines (and, so that
tests never touch the machine's shared Redis, its redis_url string) changed; the rest checks each
documented behaviour: retry schedules, status shape, batch, purge, dedup, retries into
``queue:failures``, timeouts for sync processors, and refusal of unregistered processors.
"""

from __future__ import annotations

import asyncio
import datetime
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, FailureReason, JobState
from conveyor.compat import QueueConfig, QueueManager, QueueRetryConfig, QueueWorker
from conveyor.compat.utils import (
    CircuitOpenError,
    CircuitState,
    circuit_breaker,
    retry_with_backoff,
    with_timeout,
)
from conveyor.errors import ConfigurationError, UnknownTask

HERE = Path(__file__).parent
EXAMPLE = HERE / "seed002_example.py"
# The seed documents live in shared/ beside the checkout (where this checkout has them).
SEED_GLOB = str(Path(__file__).resolve().parents[3] / "shared" / "seeds" / "002_*.txt")

ORIGINAL_IMPORTS = (
    "from queue_system import QueueConfig, QueueManager, QueueWorker, QueueRetryConfig\n"
    "from utils import with_timeout, circuit_breaker, retry_with_backoff\n"
)
COMPAT_IMPORTS = (
    "from conveyor.compat import QueueConfig, QueueManager, QueueWorker, QueueRetryConfig\n"
    "from conveyor.compat.utils import with_timeout, circuit_breaker, retry_with_backoff\n"
)
ORIGINAL_URL = 'redis_url="redis://localhost:6379/0"'


def flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


# -- processors and callbacks (module level: registered by module.qualname) ----------------------

CALLS: list[dict[str, Any]] = []


async def echo(entity: dict[str, Any]) -> dict[str, Any]:
    return {"status": "success", "result": entity}


def sync_echo(entity: dict[str, Any]) -> dict[str, Any]:
    return {"status": "success", "result": entity}


async def always_fails(entity: dict[str, Any]) -> None:
    raise ValueError(f"cannot process {entity['id']}")


def sleeps_too_long(entity: dict[str, Any]) -> str:
    time.sleep(entity["sleep_s"])
    return "finished"


async def record_success(data: dict[str, Any]) -> None:
    CALLS.append({"kind": "success", **data})


def record_failure(data: dict[str, Any]) -> None:
    CALLS.append({"kind": "failure", **data})


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh broker of each kind: a SQLite file in tmp_path, or the flushed private Redis."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'seed002.db'}"
    url: str = request.getfixturevalue("redis_url")
    flush(url)
    return url


@pytest.fixture
def config(broker_url: str) -> Iterator[QueueConfig]:
    """A QueueConfig on that broker, closed after the test (sync tests)."""
    cfg = QueueConfig(url=broker_url)
    yield cfg
    cfg.close()


@pytest.fixture
async def aconfig(broker_url: str) -> AsyncIterator[QueueConfig]:
    """A QueueConfig for async tests, whose app (and sync client) is closed on the test's loop."""
    CALLS.clear()
    cfg = QueueConfig(url=broker_url)
    yield cfg
    await cfg.aclose()


async def wait_for(predicate: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """Poll ``predicate`` (a sync or async callable) until truthy, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


# -- the seed's Basic Usage example, as a subprocess ---------------------------------------------


def test_example_file_is_the_seed_snippet_verbatim() -> None:
    copy = EXAMPLE.read_text().split("# --- seed 002 Basic Usage ---\n", 1)[1]
    assert ORIGINAL_IMPORTS in copy
    assert copy.count(ORIGINAL_URL) == 1
    for seed in glob.glob(SEED_GLOB):  # the seed document, where this checkout has it
        text = Path(seed).read_text()
        snippet = text.split("## Basic Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        assert copy == snippet


@pytest.mark.redis
@pytest.mark.slow
def test_basic_usage_example_runs_and_stops_on_ctrl_c(redis_url: str, tmp_path: Path) -> None:
    flush(redis_url)
    source = EXAMPLE.read_text().split("# --- seed 002 Basic Usage ---\n", 1)[1]
    # The only changes: the two import lines, and the Redis URL. The URL is the one change
    # beyond imports, made because tests must never touch the machine's shared Redis on 6379.
    program = source.replace(ORIGINAL_IMPORTS, COMPAT_IMPORTS).replace(
        ORIGINAL_URL, f'redis_url="{redis_url}"'
    )
    assert program.count(COMPAT_IMPORTS) == 1
    assert program.count(redis_url) == 1
    script = tmp_path / "example.py"
    script.write_text(program)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stderr_path = tmp_path / "stderr.txt"
    out: list[str] = []
    with (
        stderr_path.open("w") as stderr_file,
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")))  # type: ignore[union-attr]
        reader.start()
        try:
            deadline = time.monotonic() + 30
            while not any("Successfully processed" in line for line in out):
                assert proc.poll() is None, f"example exited early: {stderr_path.read_text()}"
                assert time.monotonic() < deadline, "on_success never printed"
                time.sleep(0.05)
            # data['result'] is what the processor returned.
            assert (
                "Successfully processed: "
                "{'status': 'success', 'result': {'user_id': '123', 'action': 'update'}}"
            ) in "".join(out)
            while asyncio.run(completed_tasks(redis_url)) != [
                "__main__.async_processor",
                "__main__.sync_processor",
            ]:
                assert time.monotonic() < deadline, "the sync processor's job never completed"
                time.sleep(0.1)

            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            proc.wait(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
    stderr = stderr_path.read_text()
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    # The worker stopped gracefully first, then asyncio.run's own Ctrl+C handling went ahead.
    assert "KeyboardInterrupt" in stderr
    for sloppy in ("Task was destroyed", "was never awaited", "Unclosed", "ERROR", "CRITICAL"):
        assert sloppy not in stderr, stderr


async def completed_tasks(url: str) -> list[str]:
    """The task names of the completed jobs in the broker at ``url``."""
    async with Conveyor(url) as app:
        page = await app.list_jobs(states=[JobState.COMPLETED])
        return sorted(job.task for job in page.jobs)


GRACEFUL_SCRIPT = """
import asyncio
from conveyor.compat import QueueConfig, QueueManager, QueueWorker

config = QueueConfig(url={url!r})
queue = QueueManager(config)
worker = QueueWorker(config, grace_period_s=0.5)

async def slow(entity):
    print("running", flush=True)
    await asyncio.sleep(60)

print(queue.enqueue({{"id": 1}}, slow, operation_id="slow-1")["status"], flush=True)

async def main():
    await worker.start()
    while True:
        await asyncio.sleep(1)

asyncio.run(main())
"""


@pytest.mark.slow
def test_ctrl_c_releases_a_running_operation_before_the_program_ends(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'graceful.db'}"
    script = tmp_path / "graceful.py"
    script.write_text(GRACEFUL_SCRIPT.format(url=url))
    with subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == "queued\n"
            assert proc.stdout.readline() == "running\n"
            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            _, stderr = proc.communicate(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert "KeyboardInterrupt" in stderr

    async def stored() -> Any:
        async with Conveyor(url) as app:
            return await app.get_job("slow-1")

    job = asyncio.run(stored())
    # Released by the graceful stop: back in the queue, no attempt charged.
    assert job.state is JobState.QUEUED
    assert job.attempts == 0


# -- QueueRetryConfig: the documented schedules --------------------------------------------------


def test_fixed_retry_waits_the_same_delay_before_each_retry() -> None:
    retry_config = QueueRetryConfig.fixed(delay=30, max_attempts=3, timeout=300)
    assert [retry_config.get_delay_for_attempt(n) for n in (1, 2, 3)] == [30.0, 30.0, 30.0]
    # "Maximum 3 retry attempts": 3 retries after the first run.
    assert retry_config.to_policy().max_attempts == 4
    assert retry_config.to_policy().spec.deadline_s == 300


def test_exponential_retry_doubles_from_min_delay_up_to_max_delay() -> None:
    retry_config = QueueRetryConfig.exponential(
        base=2.0, min_delay=1.0, max_delay=60.0, max_attempts=5, timeout=3600
    )
    assert retry_config.delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    for n, expected in enumerate(retry_config.delays, start=1):
        assert expected * 0.9 <= retry_config.get_delay_for_attempt(n) <= expected * 1.1
    capped = QueueRetryConfig.exponential(max_attempts=8, jitter=0.0)
    assert [capped.get_delay_for_attempt(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_custom_retry_follows_the_schedule_then_repeats_its_last_delay() -> None:
    retry_config = QueueRetryConfig.custom(delays=[60, 300, 1800, 7200], timeout=86400)
    assert retry_config.max_attempts == 4
    assert [retry_config.get_delay_for_attempt(n) for n in range(1, 6)] == [
        60,
        300,
        1800,
        7200,
        7200,
    ]


def test_default_retry_is_exponential_from_one_second() -> None:
    retry_config = QueueRetryConfig()
    assert retry_config.max_attempts == 5
    assert retry_config.delays == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_retry_config_round_trips_through_a_dict_and_checks_the_timeout() -> None:
    retry_config = QueueRetryConfig.custom([5, 10], max_attempts=3, timeout=60)
    assert QueueRetryConfig.from_dict(retry_config.to_dict()) == retry_config
    assert QueueRetryConfig.from_dict({"max_attempts": 2, "delays": [1]}).max_attempts == 2
    assert not retry_config.would_exceed_timeout(1000.0, 1050.0)
    assert retry_config.would_exceed_timeout(1000.0, 1050.0, next_delay=11)
    assert not QueueRetryConfig().would_exceed_timeout(0.0, 10**9)


def test_invalid_retry_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        QueueRetryConfig.custom([])
    with pytest.raises(ConfigurationError):
        QueueRetryConfig.fixed(-1)
    with pytest.raises(ConfigurationError):
        QueueRetryConfig(max_attempts=-1)


# -- QueueManager without a worker ---------------------------------------------------------------


def test_queue_status_has_the_seed_shape(config: QueueConfig) -> None:
    queue = QueueManager(config=config)
    queue.enqueue({"id": 1}, echo, priority="high")
    queue.enqueue({"id": 2}, sync_echo)
    queue.enqueue({"id": 3}, sync_echo)
    queue.enqueue({"id": 4}, echo, queue_name="reports", priority="low")
    status = queue.get_queue_status()
    assert {k: v for k, v in status.items() if k.startswith("queue:")} == {
        "queue:high:default": 1,
        "queue:normal:default": 2,
        "queue:low:default": 0,
        "queue:high:reports": 0,
        "queue:normal:reports": 0,
        "queue:low:reports": 1,
        "queue:failures": 0,
        "queue:system_errors": 0,
    }
    assert status["total_items"] == 4
    assert status["metrics"]["enqueued"] == 4
    for key in (
        "processed",
        "failed",
        "retried",
        "timeouts",
        "thread_pool_exhaustion",
        "thread_pool_utilization",
        "success_rate",
    ):
        assert key in status["metrics"]
    assert status["metrics"]["thread_pool_exhaustion"] == 0
    assert abs(status["status_time"] - time.time()) < 60


def test_enqueue_returns_the_operation_id_status_queue_and_priority(config: QueueConfig) -> None:
    queue = QueueManager(config)
    result = queue.enqueue({"id": 1}, echo, priority="high", operation_id="op-1")
    assert result["operation_id"] == "op-1"
    assert result["status"] == "queued"
    assert result["queue"] == "default"
    assert result["priority"] == "high"
    assert result["queue_key"] == config.get_queue_key("default", "high") == "queue:high:default"
    job = config.sync.get_job("op-1")
    assert job is not None
    assert job.args == [{"id": 1}]
    assert job.task == f"{__name__}.echo"
    assert job.timeout_s == 30.0  # the seed's work_timeout default


def test_enqueue_batch_returns_one_result_per_entity(config: QueueConfig) -> None:
    queue = QueueManager(config)
    entities = [
        {"id": 1, "name": "Item 1"},
        {"id": 2, "name": "Item 2"},
        {"id": 3, "name": "Item 3"},
    ]
    retry_config = QueueRetryConfig.fixed(delay=1, max_attempts=2)
    results = queue.enqueue_batch(
        entities=entities, processor=sync_echo, priority="high", retry_config=retry_config
    )
    assert len(results) == 3
    assert len({r["operation_id"] for r in results}) == 3
    assert all(r["status"] == "queued" and r["priority"] == "high" for r in results)
    jobs = [config.sync.get_job(r["operation_id"]) for r in results]
    assert [j.args[0] for j in jobs if j is not None] == entities
    assert {j.max_attempts for j in jobs if j is not None} == {3}
    assert queue.get_queue_status()["queue:high:default"] == 3
    with pytest.raises(ConfigurationError, match="one by one"):
        queue.enqueue_batch(entities, sync_echo, operation_id="same-for-all")


def test_purge_queue_removes_only_that_priority_and_counts(config: QueueConfig) -> None:
    queue = QueueManager(config)
    queue.enqueue_batch([{"id": i} for i in range(3)], echo, priority="low")
    queue.enqueue_batch([{"id": i} for i in range(2)], echo)
    assert queue.purge_queue("default", "low") == 3
    assert queue.purge_queue("default", "low") == 0
    status = queue.get_queue_status()
    assert status["queue:low:default"] == 0
    assert status["queue:normal:default"] == 2
    assert queue.purge_queue("default", priority=None) == 2
    assert queue.get_queue_status()["total_items"] == 0


def test_deduplication_key_returns_the_existing_operation(config: QueueConfig) -> None:
    queue = QueueManager(config)
    first = queue.enqueue({"id": 1}, echo, deduplication_key="user-123")
    second = queue.enqueue({"id": 1}, echo, deduplication_key="user-123")
    assert first["status"] == "queued"
    assert second["status"] == "duplicate"
    assert second["operation_id"] == first["operation_id"]
    assert queue.get_queue_status()["total_items"] == 1
    assert config.get_metrics()["duplicates"] == 1


def test_a_processor_named_but_not_registered_is_refused_at_enqueue(config: QueueConfig) -> None:
    queue = QueueManager(config)
    with pytest.raises(UnknownTask, match=r"os\.system"):
        queue.enqueue({"cmd": "true"}, "os.system")
    with pytest.raises(UnknownTask):
        queue.enqueue({"id": 1}, echo, on_success="nowhere.callback")
    assert queue.get_queue_status()["total_items"] == 0
    # A function passed once is registered, and may be named from then on.
    queue.enqueue({"id": 1}, echo)
    assert queue.enqueue({"id": 2}, f"{__name__}.echo")["status"] == "queued"


def test_entities_go_through_the_custom_serializer(config: QueueConfig) -> None:
    queue = QueueManager(config)
    when = datetime.date(2024, 5, 1)
    result = queue.enqueue({"day": when}, echo, custom_serializer=lambda v: v.isoformat())
    job = config.sync.get_job(result["operation_id"])
    assert job is not None
    assert job.args == [{"day": "2024-05-01"}]
    with pytest.raises(Exception, match="JSON"):
        queue.enqueue({"day": when}, echo)


def test_bad_arguments_are_refused_and_write_nothing(config: QueueConfig) -> None:
    queue = QueueManager(config)
    with pytest.raises(Exception, match="priority"):
        queue.enqueue({"id": 1}, echo, priority="urgent")
    with pytest.raises(Exception, match="queue name"):
        queue.enqueue({"id": 1}, echo, queue_name="bad name!")
    assert queue.get_queue_status()["total_items"] == 0


def test_config_takes_its_address_from_a_redis_client(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        config = QueueConfig(redis_client=client)
        assert config.app.url == redis_url
    finally:
        client.close()
    with pytest.raises(ConfigurationError, match="one broker source"):
        QueueConfig(redis_url=redis_url, url="sqlite:///x.db")


# -- with a QueueWorker --------------------------------------------------------------------------


async def test_worker_runs_operations_and_calls_on_success_with_the_result(
    aconfig: QueueConfig,
) -> None:
    queue = QueueManager(aconfig)
    first = queue.enqueue({"user_id": "123"}, echo, priority="high", on_success=record_success)
    second = queue.enqueue({"order_id": "456"}, sync_echo, on_success=record_success)
    worker = QueueWorker(aconfig, max_workers=2, thread_pool_size=2)
    await worker.start()
    try:
        await wait_for(lambda: len(CALLS) == 2)
    finally:
        await worker.stop()
    by_id = {c["operation_id"]: c for c in CALLS}
    assert by_id[first["operation_id"]]["result"] == {
        "status": "success",
        "result": {"user_id": "123"},
    }
    assert by_id[second["operation_id"]]["entity"] == {"order_id": "456"}
    assert by_id[second["operation_id"]]["status"] == "completed"
    metrics = aconfig.get_metrics()
    assert metrics["processed"] >= 2
    assert metrics["thread_pool_exhaustion"] == 0
    await worker.stop()  # idempotent


async def test_failing_processor_retries_per_config_then_lands_in_failures(
    aconfig: QueueConfig,
) -> None:
    queue = QueueManager(aconfig)
    result = queue.enqueue(
        {"id": 7},
        always_fails,
        retry_config=QueueRetryConfig.fixed(delay=0.1, max_attempts=2),
        on_failure=record_failure,
    )
    async with QueueWorker(aconfig, max_workers=2):
        await wait_for(lambda: CALLS)
        job = await aconfig.app.get_job(result["operation_id"])
    assert job is not None
    assert job.state is JobState.FAILED
    assert job.attempts == 3  # the first run and 2 retries
    assert job.failure_reason == FailureReason.EXHAUSTED
    assert "cannot process 7" in (job.error or "")
    [call] = CALLS
    assert call["kind"] == "failure"
    assert call["status"] == "failed"
    assert call["entity"] == {"id": 7}
    assert "cannot process 7" in call["error"]
    status = await queue.aget_queue_status()
    assert status["queue:failures"] == 1
    assert status["queue:system_errors"] == 0
    assert status["total_items"] == 1
    assert status["metrics"]["retried"] == 2
    assert status["metrics"]["failed"] == 1
    assert status["metrics"]["success_rate"] == 0.0


@pytest.mark.slow
async def test_sync_processor_over_its_timeout_fails_instead_of_hanging(
    aconfig: QueueConfig,
) -> None:
    queue = QueueManager(aconfig)
    result = queue.enqueue(
        {"sleep_s": 3.0},
        sleeps_too_long,
        timeout=0.5,
        retry_config=QueueRetryConfig(max_attempts=0),
    )
    started = time.monotonic()
    async with QueueWorker(aconfig, thread_pool_size=2):

        async def failed() -> bool:
            job = await aconfig.app.get_job(result["operation_id"])
            return job is not None and job.state is JobState.FAILED

        await wait_for(failed, timeout_s=10)
    assert time.monotonic() - started < 3.0
    job = await aconfig.app.get_job(result["operation_id"])
    assert job is not None
    assert job.failure_reason == FailureReason.TIMEOUT
    assert "time" in (job.error or "").lower()
    assert aconfig.get_metrics()["timeouts"] >= 1


async def test_operations_enqueued_from_async_code_do_not_block_the_loop(
    aconfig: QueueConfig,
) -> None:
    queue = QueueManager(aconfig)
    results = await queue.aenqueue_batch([{"id": i} for i in range(5)], echo)
    single = await queue.aenqueue({"id": 9}, sync_echo, priority="low")
    async with QueueWorker(aconfig, max_workers=5):

        async def all_done() -> bool:
            ids = [r["operation_id"] for r in [*results, single]]
            jobs = [await aconfig.app.get_job(i) for i in ids]
            return all(j is not None and j.state is JobState.COMPLETED for j in jobs)

        await wait_for(all_done)
    assert (await queue.aget_queue_status())["total_items"] == 0


async def test_a_job_naming_a_task_the_worker_lacks_lands_in_system_errors(
    aconfig: QueueConfig,
) -> None:
    # A producer elsewhere (plain conveyor client) names a task this worker never registered.
    handle = await aconfig.app.enqueue("elsewhere.unknown_processor", args=[{"id": 1}])
    async with QueueWorker(aconfig):

        async def failed() -> bool:
            job = await aconfig.app.get_job(handle.id)
            return job is not None and job.state is JobState.FAILED

        await wait_for(failed)
    status = await QueueManager(aconfig).aget_queue_status()
    assert status["queue:system_errors"] == 1
    assert status["queue:failures"] == 0


class Resizer:
    def __init__(self, width: int) -> None:
        self.width = width

    def resize(self, entity: dict[str, Any]) -> int:
        return self.width


def test_a_bound_method_processor_can_be_enqueued_again(config: QueueConfig) -> None:
    queue = QueueManager(config)
    resizer = Resizer(10)
    queue.enqueue({"id": 1}, resizer.resize)
    assert queue.enqueue({"id": 2}, resizer.resize)["processor"] == f"{__name__}.Resizer.resize"


async def test_a_worker_runs_processors_from_the_modules_it_is_allowed(
    broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "seed002_allowed.py").write_text(
        "def shout(entity):\n    return entity['text'].upper()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import seed002_allowed  # type: ignore[import-not-found]

    producer = QueueConfig(url=broker_url)
    consumer = QueueConfig(url=broker_url)  # knows nothing until its worker loads the module
    try:
        result = await QueueManager(producer).aenqueue({"text": "hi"}, seed002_allowed.shout)
        assert result["processor"] == "seed002_allowed.shout"
        async with QueueWorker(consumer, modules=["seed002_allowed"]):

            async def done() -> Any:
                job = await consumer.app.get_job(result["operation_id"])
                return job is not None and job.state is JobState.COMPLETED and job

            job = await wait_for(done)
        assert job.result == "HI"
        assert "seed002_allowed.shout" in consumer.app.registry
    finally:
        await producer.aclose()
        await consumer.aclose()


# -- conveyor.compat.utils -----------------------------------------------------------------------


async def test_with_timeout_cancels_a_slow_coroutine() -> None:
    @with_timeout(0.05)
    async def slow() -> None:
        await asyncio.sleep(5)

    @with_timeout
    async def quick() -> int:
        return 1

    with pytest.raises(TimeoutError, match=r"0\.05"):
        await slow()
    assert await quick() == 1
    with pytest.raises(ConfigurationError, match="async functions only"):
        with_timeout(0.1)(sync_echo)  # type: ignore[arg-type]


def test_circuit_breaker_opens_after_repeated_failures_and_recovers() -> None:
    now = [0.0]
    calls = []

    @circuit_breaker(failure_threshold=2, recovery_timeout_s=10, clock=lambda: now[0])
    def flaky(ok: bool) -> str:
        calls.append(ok)
        if not ok:
            raise OSError("down")
        return "up"

    breaker = flaky.breaker  # type: ignore[attr-defined]
    for _ in range(2):
        with pytest.raises(OSError):
            flaky(False)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        flaky(True)
    assert len(calls) == 2  # failed fast, without calling
    now[0] = 11
    assert breaker.state is CircuitState.HALF_OPEN
    assert flaky(True) == "up"
    assert breaker.state is CircuitState.CLOSED


async def test_circuit_breaker_guards_async_functions_too() -> None:
    @circuit_breaker(failure_threshold=1, recovery_timeout_s=60)
    async def down() -> None:
        raise ConnectionError("no")

    with pytest.raises(ConnectionError):
        await down()
    with pytest.raises(CircuitOpenError):
        await down()


async def test_retry_with_backoff_retries_then_succeeds_or_reraises() -> None:
    attempts = []

    @retry_with_backoff(max_attempts=3, base_delay_s=0.01, exceptions=(OSError,))
    async def eventually(n: int) -> int:
        attempts.append(n)
        if len(attempts) < n:
            raise OSError("not yet")
        return len(attempts)

    assert await eventually(3) == 3
    attempts.clear()
    with pytest.raises(OSError):
        await eventually(5)
    assert len(attempts) == 3

    count = []

    @retry_with_backoff
    def wrong_kind() -> None:
        count.append(1)
        raise CircuitOpenError()

    with pytest.raises(CircuitOpenError):
        wrong_kind()
    assert count == [1]  # an open circuit is never retried
