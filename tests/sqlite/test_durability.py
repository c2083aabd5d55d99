"""Durability: everything a broker stored is there, unchanged, after close/re-open or a crash."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

from conveyor.brokers.base import EventKind, JobEvent
from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.clock import FakeClock
from conveyor.job import FailureReason, Job, JobState, Priority, RetrySpec, new_job_id


def _job(**fields: object) -> Job:
    return Job(id=new_job_id(), task="tests.noop", queue="q", **fields)  # type: ignore[arg-type]


async def _events(broker: SQLiteBroker, after: str) -> list[JobEvent]:
    """Every retained event after ``after`` (the stream is endless: stop at the newest)."""
    newest = await broker._db.read(
        lambda conn: conn.execute("SELECT max(id) FROM events").fetchone()[0]
    )
    out: list[JobEvent] = []
    async with contextlib.aclosing(broker.subscribe(after=after)) as stream:  # type: ignore[type-var]
        async for event in stream:
            out.append(event)
            if int(event.id) >= newest:
                break
    return out


async def test_every_job_log_and_event_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "conveyor.db")
    clock = FakeClock()
    async with SQLiteBroker(path, clock=clock) as broker:
        queued = _job(
            args=[1, "two", [3.5]],
            kwargs={"k": {"n": None}},
            priority=Priority.HIGH,
            timeout_s=2.5,
            retry=RetrySpec(kind="fixed", delay_s=3.0),
            on_success="tests.after",
            dedup_key="once",
        )
        scheduled = _job(run_at_ms=clock.now_ms() + 60_000)
        pending = _job(state=JobState.PENDING)
        running, completed, failed = _job(), _job(), _job()
        await broker.enqueue([queued, scheduled, pending])
        await broker.enqueue([running, completed, failed])
        taken = {j.id: j for j in await broker.reserve("q", 10, lease_s=30, worker_id="w")}
        await broker.release(taken[queued.id].lease)
        await broker.set_progress(taken[running.id].lease, 40, "going")
        await broker.append_log(taken[running.id].lease, ["one", "two"])
        await broker.ack(taken[completed.id].lease, {"answer": 42})
        await broker.dead_letter(
            taken[failed.id].lease, reason=FailureReason.GAVE_UP, error="boom", traceback="tb"
        )
        before = {
            j.id: await broker.get(j.id)
            for j in (queued, scheduled, pending, running, completed, failed)
        }
        counts = await broker.counts()
        events = await _events(broker, after="0")

    async with SQLiteBroker(path, clock=clock) as reopened:
        for job_id, job in before.items():
            assert await reopened.get(job_id) == job
        assert await reopened.counts() == counts
        assert await reopened.queues() == ["q"]
        page = await reopened.logs(running.id)
        assert (page.lines, page.dropped, page.total) == (["one", "two"], 0, 2)
        assert await _events(reopened, after="0") == events
        # the lease handed out before the restart is still good; the dedup key still held
        await reopened.ack(taken[running.id].lease, "late but valid")
        assert await reopened.enqueue([_job(dedup_key="once")]) == [queued.id]
        # new events continue after the old ids
        last = int(events[-1].id)
        [again] = await _events(reopened, after=str(last))
        assert int(again.id) > last
        assert (again.kind, again.job_id, again.transition) == (EventKind.STATE, running.id, "ack")


async def test_a_committed_enqueue_survives_the_process_being_killed(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from conveyor.brokers.sqlite import SQLiteBroker
        from conveyor.job import Job

        async def main():
            broker = SQLiteBroker({str(path)!r})
            await broker.connect()
            jobs = [Job(id=f"survivor-{{i}}", task="t.x", queue="q") for i in range(50)]
            await broker.enqueue(jobs)
            os._exit(0)  # no close, no checkpoint: the rows are only in the WAL

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert Path(str(path) + "-wal").exists()
    async with SQLiteBroker(str(path)) as broker:
        assert (await broker.counts("q"))["q"][JobState.QUEUED] == 50
        assert (await broker.get("survivor-49")) is not None
