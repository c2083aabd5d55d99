"""The failpoint wrapper: parsing, which calls are hits, raise/kill actions, and a real SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.brokers.memory import MemoryBroker
from conveyor.client import Conveyor
from conveyor.job import JobState
from conveyor.testing import failpoints
from conveyor.testing.failpoints import Failpoint, FailpointError


def test_parse_forms() -> None:
    point = Failpoint.parse("ack:after")
    assert (point.step, point.action, point.nth, point.onwards) == ("ack", "after", 1, False)
    point = Failpoint.parse("dead-letter:before:3")
    assert (point.step, point.nth) == ("dead_letter", 3)
    point = Failpoint.parse("reserve:raise:2+")
    assert (point.action, point.nth, point.onwards, point.spec) == (
        "raise",
        2,
        True,
        "reserve:raise:2+",
    )


@pytest.mark.parametrize(
    "spec", ["ack", "nack:after", "ack:later", "ack:after:0", "ack:after:x", "a:b:c:d"]
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="failpoint"):
        Failpoint.parse(spec)


def test_install_from_env_is_a_no_op_when_unset() -> None:
    broker = MemoryBroker()
    assert failpoints.install_from_env(broker, {}) is None
    assert "reserve" not in vars(broker)  # nothing wrapped


async def _app_with(spec: str, kills: list[str]) -> tuple[Conveyor, Failpoint]:
    app = Conveyor(broker=MemoryBroker())
    point = failpoints.install(app.broker, spec)
    point._kill = lambda: kills.append(point.spec)  # stand-in for SIGKILL (tested below)
    await app.connect()
    return app, point


async def test_raise_fails_the_nth_call_only_and_changes_nothing() -> None:
    app, point = await _app_with("enqueue:raise:2", [])
    async with app:
        first = await app.enqueue("t", args=[1])
        with pytest.raises(FailpointError):
            await app.enqueue("t", args=[2])
        third = await app.enqueue("t", args=[3])
        counts = await app.counts("default")
    assert counts["default"][JobState.QUEUED] == 2  # the refused call wrote nothing
    assert first.id != third.id
    assert (point.hits, point.fired) == (3, 1)


async def test_raise_onwards_fails_every_later_reserve() -> None:
    app, point = await _app_with("reserve:raise:1+", [])
    async with app:
        await app.enqueue("t")
        for _ in range(3):
            with pytest.raises(FailpointError):
                await app.broker.reserve("default", 1, lease_s=5)
    assert point.fired == 3


async def test_before_kills_without_the_call_and_after_kills_once_it_happened() -> None:
    kills: list[str] = []
    app, _ = await _app_with("reserve:before:1", kills)
    async with app:
        await app.enqueue("t")
        jobs = await app.broker.reserve("default", 1, lease_s=5)
        # The stand-in does not die, so the call goes on; what matters is the order.
        assert kills == ["reserve:before:1"]
        assert len(jobs) == 1
    kills.clear()
    app, _ = await _app_with("ack:after:1", kills)
    async with app:
        await app.enqueue("t")
        [job] = await app.broker.reserve("default", 1, lease_s=5)
        assert job.lease is not None
        await app.broker.ack(job.lease, "ok")
        stored = await app.get_job(job.id)
    assert kills == ["ack:after:1"]
    assert stored is not None
    assert stored.state is JobState.COMPLETED


async def test_ack_and_reserve_counts_once_and_only_for_its_parts() -> None:
    kills: list[str] = []
    app, point = await _app_with("ack:after:1", kills)
    async with app:
        await app.enqueue_many([app.request("t") for _ in range(2)])
        # No acks: not an ack hit (even though the default implementation may call ack_many).
        [job] = (await app.broker.ack_and_reserve([], "default", 1, lease_s=5))[1]
        assert point.hits == 0
        assert job.lease is not None
        await app.broker.ack_and_reserve([(job.lease, None)], "default", 1, lease_s=5)
    assert point.hits == 1
    assert kills == ["ack:after:1"]


def test_a_real_process_dies_by_sigkill_after_the_call(tmp_path: Path) -> None:
    db = tmp_path / "fp.db"
    program = (
        "import asyncio\n"
        "from conveyor.client import Conveyor\n"
        "from conveyor.testing import failpoints\n"
        f"app = Conveyor('sqlite:///{db}')\n"
        "failpoints.install_from_env(app.broker)\n"
        "async def main():\n"
        "    async with app:\n"
        "        await app.enqueue('t', job_id='written')\n"
        "        print('survived', flush=True)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, failpoints.FAILPOINT_ENV: "enqueue:after"}
    proc = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == -signal.SIGKILL
    assert "survived" not in proc.stdout
    assert "failpoint enqueue:after fired on hit 1" in proc.stderr

    async def stored() -> JobState | None:
        async with Conveyor(f"sqlite:///{db}") as app:
            job = await app.get_job("written")
            return job.state if job else None

    assert asyncio.run(stored()) is JobState.QUEUED  # "after": the broker did it
