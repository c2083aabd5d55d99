"""Bad task payloads and results (reliability plan 7.9, Y1-Y4), on every broker.

Y1 values with no JSON form are refused at enqueue with a typed error naming their path. Y2
payloads that look like serialized objects stay data: a worker *process* runs them, nothing is
imported or unpickled, and ``pickle`` is not even loaded there. Y3 results that cannot be stored
fail the job with a clear error and reading a failure back never rebuilds an exception class.
Y4 arguments that do not fit the task fail at enqueue when the producer knows the task, else go
to dead letters on the first attempt (never retried).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, JobContext
from conveyor.brokers.redis.keys import QueueKeys
from conveyor.codec import UndecodablePayload
from conveyor.errors import InvalidJobError, JobFailed, PayloadError, UnencodablePayloadError
from conveyor.job import FailureReason, Job, JobState
from conveyor.testing.chaos import poison_tasks as pt
from conveyor.testing.chaos import tasks
from conveyor.testing.faults import Child
from conveyor.worker import Worker


@pytest.fixture
def url(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A private broker URL of each kind (Redis flushed first)."""
    return _url_for(broker_kind, request, tmp_path)


def _url_for(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if broker_kind == "memory":
        return "memory://"
    if broker_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'payloads.db'}"
    import redis

    redis_url: str = request.getfixturevalue("redis_url")
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_url


@asynccontextmanager
async def running(app: Conveyor) -> AsyncIterator[Worker]:
    """An in-process worker for the length of the block (stopped within a bound)."""
    worker = Worker(app, lease_s=5.0, heartbeat_s=0.1, scan_interval_s=0.2, grace_period_s=2.0)
    await worker.start()
    try:
        yield worker
    finally:
        async with asyncio.timeout(10):
            await worker.stop()


async def finished(app: Conveyor, job_id: str, timeout_s: float = 10.0) -> Job:
    """Poll until the job is finished; its record."""
    async with asyncio.timeout(timeout_s):
        while True:
            job = await app.get_job(job_id)
            if job is not None and job.state.is_finished:
                return job
            await asyncio.sleep(0.05)


# -- Y1: values with no JSON form ----------------------------------------------------------------


class _Custom:
    pass


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


Y1_CASES: list[tuple[str, Any, str]] = [
    ("bytes", b"\x00raw", "bytes"),
    ("datetime", datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), "datetime"),
    ("set", {1, 2}, "set"),
    ("custom", _Custom(), "_Custom"),
    ("circular", _circular(), "nested deeper than 64 levels"),
]


@pytest.mark.parametrize(("label", "value", "named"), Y1_CASES, ids=[c[0] for c in Y1_CASES])
async def test_y1_values_without_json_form_are_refused_at_enqueue_naming_their_path(
    url: str, label: str, value: Any, named: str
) -> None:
    async with Conveyor(url) as app:
        with pytest.raises(UnencodablePayloadError) as caught:
            await app.enqueue("y.any", args=[1, {"inner": [value]}])
        message = str(caught.value)
        # The path of the offending value, so the caller knows which argument to fix.
        assert "[0][1]['inner'][0]" in message, message
        assert named in message, message
        with pytest.raises(UnencodablePayloadError, match=r"\['when'\]"):
            await app.enqueue("y.any", kwargs={"when": value})
        counts = await app.counts()
        assert sum(sum(by_state.values()) for by_state in counts.values()) == 0, "nothing stored"


# -- Y2: payloads that look like serialized objects ----------------------------------------------


class _Reduces:
    """Unpickling this would run a shell command (the classic pickle RCE)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _object_looking_payload(marker: Path) -> dict[str, Any]:
    import pickle  # the test builds the hostile bytes; only the worker must never load pickle

    opcodes = base64.b64encode(pickle.dumps(_Reduces(marker))).decode()
    return {
        "__class__": "os.system",
        "module": "os",
        "callable": "system",
        "py/object": "subprocess.Popen",
        "py/reduce": [{"py/type": "os.system"}, {"py/tuple": [f"touch {marker}"]}],
        "__reduce__": ["os.system", [f"touch {marker}"]],
        "pickle": opcodes,
        "$type": "System.Diagnostics.Process",
        "!!python/object/apply:os.system": [f"touch {marker}"],
    }


@pytest.fixture
def worker_process(url: str, tmp_path: Path) -> Iterator[Child | None]:
    """The chaos worker program on ``url`` (None for memory, which lives in one process)."""
    if url == "memory://":
        yield None
        return
    child = Child(
        [sys.executable, "-m", "conveyor.testing.chaos.worker", "--lease", "5"],
        env={"CONVEYOR_URL": url, tasks.LEDGER_ENV: str(tmp_path / "ledger")},
        stderr_path=tmp_path / "worker.err",
    )
    try:
        assert child.wait_ready(30), child.stderr()[-2000:]
        yield child
    finally:
        child.kill()
        child.close()


@pytest.mark.timeout(90)
async def test_y2_object_looking_payloads_are_data_and_the_worker_never_loads_pickle(
    url: str, tmp_path: Path, worker_process: Child | None
) -> None:
    marker = tmp_path / "unpickled.marker"
    payload = _object_looking_payload(marker)
    async with Conveyor(url) as app:
        if worker_process is None:
            # memory: the worker shares this process (where pytest has loaded pickle already),
            # so only the data round trip is checked here.
            app.registry.add(pt.echo)
        handle: Any = await app.enqueue(pt.ECHO, args=[payload], kwargs={"also": payload})
        if worker_process is None:
            async with running(app):
                job = await finished(app, handle.id)
        else:
            job = await finished(app, handle.id, 30)
        assert job.state is JobState.COMPLETED, job.error
        assert job.result == {"args": [payload], "kwargs": {"also": payload}}
        assert not marker.exists(), "the payload was unpickled or executed"
        if worker_process is not None:
            probe: Any = await app.enqueue(pt.MODULES, args=[list(pt.UNPICKLERS)])
            loaded = await finished(app, probe.id, 30)
            assert loaded.state is JobState.COMPLETED, loaded.error
            assert loaded.result == [], f"the worker process loaded {loaded.result}"


# -- Y3: results that cannot be stored -----------------------------------------------------------


class Boom(Exception):
    """A custom exception class: its name is stored as text, never looked up again."""


def _register_y3(app: Conveyor) -> None:
    @app.task(name="y3.unencodable", max_attempts=1)
    async def unencodable() -> Any:
        return {"ok": [1, 2], "bad": {3, 4}}

    @app.task(name="y3.huge", max_attempts=1)
    async def huge() -> str:
        return "x" * (100 * 1024 * 1024)

    @app.task(name="y3.exception_result", max_attempts=1)
    async def exception_result() -> Any:
        return {"error": Boom("in a result")}

    @app.task(name="y3.raises", max_attempts=1)
    async def raises() -> None:
        raise Boom("raised")


@pytest.mark.timeout(60)
async def test_y3_unstorable_results_fail_the_job_and_failures_read_back_as_text(
    url: str,
) -> None:
    app = Conveyor(url)
    _register_y3(app)
    async with app:
        handles: dict[str, Any] = {
            name: await app.enqueue(name)
            for name in ("y3.unencodable", "y3.huge", "y3.exception_result", "y3.raises")
        }
        async with running(app):
            jobs = {name: await finished(app, h.id, 30) for name, h in handles.items()}
        for name in ("y3.unencodable", "y3.exception_result"):
            job = jobs[name]
            assert job.state is JobState.FAILED, name
            assert job.result is None
            assert job.error is not None
            assert "UnencodablePayloadError" in job.error, job.error
            assert "has no JSON form" in job.error, job.error
        big = jobs["y3.huge"]
        assert big.state is JobState.FAILED
        assert big.result is None
        assert big.error is not None
        assert "PayloadTooLargeError" in big.error, big.error
        assert "byte cap" in big.error
        # A stored failure names the class as text; reading it back raises JobFailed, never
        # an instance of the class the text names.
        failed = jobs["y3.raises"]
        assert failed.error == f"{__name__}.Boom: raised"
        with pytest.raises(JobFailed) as caught:
            await handles["y3.raises"].result(timeout_s=5)
        assert type(caught.value) is JobFailed
        assert not isinstance(caught.value, Boom)


async def test_y3_reading_a_failure_never_imports_the_module_its_error_names(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported.marker"
    module = "y3_marker_module"
    (tmp_path / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "class Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Conveyor(url)

    @app.task(name="y3.named", max_attempts=1)
    async def named() -> None:
        # An exception whose (fake) class path names an importable module with a side effect.
        raise type("Boom", (Exception,), {"__module__": module, "__qualname__": "Boom"})("x")

    async with app:
        handle: Any = await app.enqueue(named)
        async with running(app):
            job = await finished(app, handle.id)
        assert job.error == f"{module}.Boom: x"
        with pytest.raises(JobFailed):
            await handle.result(timeout_s=5)
        listed = await app.list_jobs(states=[JobState.FAILED])
        assert [j.id for j in listed.jobs] == [handle.id]
    assert module not in sys.modules
    assert not marker.exists(), "reading the failure imported the module its error names"


# -- Y4: arguments that do not fit the task ------------------------------------------------------


def _register_y4(app: Conveyor) -> None:
    @app.task(name="y4.pair")
    async def pair(ctx: JobContext, a: int, b: int) -> int:
        return a + b


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [([1], {}), ([1, 2, 3], {}), ([1, 2], {"c": 3}), ([], {"a": 1})],
    ids=["missing", "extra", "unknown-keyword", "missing-keyword"],
)
async def test_y4_a_producer_that_knows_the_task_refuses_bad_arguments_at_enqueue(
    url: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    app = Conveyor(url)
    _register_y4(app)
    async with app:
        with pytest.raises(InvalidJobError, match=r"arguments do not fit task 'y4\.pair'"):
            await app.enqueue("y4.pair", args=args, kwargs=kwargs)
        counts = await app.counts()
        assert sum(sum(by_state.values()) for by_state in counts.values()) == 0


async def test_y4_bad_arguments_by_name_dead_letter_on_the_first_attempt(url: str) -> None:
    producer = Conveyor(url)  # knows no task: it cannot check the signature
    async with producer:
        bad = [
            (await producer.enqueue("y4.pair", args=args, kwargs=kwargs)).id
            for args, kwargs in (([1], {}), ([1, 2, 3], {}), ([1, 2], {"c": 3}))
        ]
        good = (await producer.enqueue("y4.pair", args=[1, 2])).id
        app = Conveyor(broker=producer.broker) if url == "memory://" else Conveyor(url)
        _register_y4(app)
        async with app, running(app):
            jobs = [await finished(app, job_id) for job_id in bad]
            done = await finished(app, good)
    assert done.state is JobState.COMPLETED
    assert done.result == 3
    for job in jobs:
        assert job.state is JobState.FAILED
        assert job.failure_reason == FailureReason.SYSTEM_ERROR
        assert job.error is not None
        assert "arguments do not fit task 'y4.pair'" in job.error
        assert job.attempts <= 1, f"bad arguments were retried ({job.attempts} attempts)"


# -- P2 at the broker boundary: corrupt stored payloads ------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "redis"])  # memory stores objects, not bytes
async def test_a_corrupt_stored_payload_reads_as_undecodable_not_as_a_driver_error(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = _url_for(kind, request, tmp_path)
    async with Conveyor(url) as app:
        victim = (await app.enqueue("p2.any", args=[1])).id
        other = (await app.enqueue("p2.any", args=[2])).id
        if url.startswith("sqlite"):
            import sqlite3

            db = sqlite3.connect(str(tmp_path / "payloads.db"))
            db.execute("UPDATE jobs SET payload = ? WHERE id = ?", (b"\xff{not json", victim))
            db.commit()
            db.close()
        else:
            import redis

            client = redis.Redis.from_url(url)
            record = (
                b'{"id":"%s","task":"p2.any","queue":"default","args":"\xff"}' % victim.encode()
            )
            client.hset(QueueKeys("conveyor", "default").jobs, victim, record)
            client.close()
        job = await app.get_job(victim)
        assert job is not None
        assert isinstance(job.args, UndecodablePayload)
        assert "DecodeError" in job.args.reason
        assert job.state is JobState.QUEUED  # still there: nothing is discarded
        listed = await app.list_jobs()
        assert {j.id for j in listed.jobs} == {victim, other}
        if not url.startswith("sqlite"):
            # Not even the id is readable: a typed conveyor error, not a msgspec one.
            client = redis.Redis.from_url(url)
            client.hset(QueueKeys("conveyor", "default").jobs, victim, b"\xff\x00")
            client.close()
            with pytest.raises(PayloadError, match="cannot be decoded"):
                await app.get_job(victim)
