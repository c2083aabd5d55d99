"""Real faults: worker processes killed and terminated by signals, with an outside ledger.

Each worker runs in its own process (``worker_main``) over a durable broker; jobs append
``start``/``end`` lines to an O_APPEND ledger, which is what "exactly once" is counted from.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, JobState

HERE = Path(__file__).parent


class WorkerProcess:
    """A ``python -m worker_main`` child with its stdout watched for ``ready``/``exited``."""

    def __init__(self, url: str, ledger: Path, *args: str, **env: str) -> None:
        environ = dict(os.environ)
        environ.update(
            CONVEYOR_URL=url,
            CONVEYOR_TEST_LEDGER=str(ledger),
            PYTHONPATH=os.pathsep.join([str(HERE), environ.get("PYTHONPATH", "")]),
            **env,
        )
        self.stderr_path = ledger.with_suffix(f".{time.monotonic_ns()}.err")
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker_main", *args],
            cwd=HERE,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.ready = threading.Event()
        self.ready_at = 0.0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready_at = time.time()
                self.ready.set()

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        if not self.ready.wait(timeout_s):
            self.kill()
            raise AssertionError(f"worker did not become ready in {timeout_s} s")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not exit within {timeout_s} s") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid


def read_ledger(path: Path) -> list[tuple[str, int, int, str, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        job_id, attempt, pid, event, ts = line.split()
        rows.append((job_id, int(attempt), int(pid), event, float(ts)))
    return rows


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.02)


async def _enqueue(url: str, n: int, seconds: float) -> list[str]:
    async with Conveyor(url) as app:
        handles = await app.enqueue_many(
            [app.request("fault.sleep", args=[seconds]) for _ in range(n)]
        )
        return [h.id for h in handles]


async def _jobs(url: str, ids: list[str]) -> list[Any]:
    async with Conveyor(url) as app:
        return [await app.get_job(i) for i in ids]


async def _count(url: str, state: JobState) -> int:
    async with Conveyor(url) as app:
        counts = await app.counts("default")
        return counts["default"][state]


@pytest.fixture
def workers() -> Any:
    started: list[WorkerProcess] = []

    def start(*args: Any, **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(*args, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_sigkill_with_200_jobs_in_flight_loses_nothing_and_recovers_within_lease_and_scan(
    kind: str, url_for: Any, tmp_path: Path, workers: Any
) -> None:
    url = url_for(kind)
    ledger = tmp_path / "ledger"
    lease_s, scan_s = 2.0, 0.5
    options = ["--lease", str(lease_s), "--scan", str(scan_s), "--concurrency", "250"]
    ids = asyncio.run(_enqueue(url, 200, 3.0))

    first = workers(url, ledger, *options)
    first.wait_ready()
    wait_until(
        lambda: sum(1 for r in read_ledger(ledger) if r[3] == "start") == 200,
        20,
        "200 jobs in flight",
    )
    killed_at = time.time()
    first.proc.send_signal(signal.SIGKILL)
    first.wait_exit(5)

    second = workers(url, ledger, *options)
    second.wait_ready()
    wait_until(lambda: asyncio.run(_count(url, JobState.COMPLETED)) == 200, 40, "all completed")
    second.signal(signal.SIGTERM)
    second.wait_exit(10)

    rows = read_ledger(ledger)
    ends = Counter(r[0] for r in rows if r[3] == "end")
    assert set(ends) == set(ids)
    assert set(ends.values()) == {1}, "a job completed more than once"
    assert all(r[2] == second.pid for r in rows if r[3] == "end")
    restarts: dict[str, float] = {}
    for job_id, attempt, pid, event, ts in rows:
        if event == "start" and pid == second.pid:
            assert attempt == 2  # the lost lease was charged once
            restarts.setdefault(job_id, ts)
    assert set(restarts) == set(ids)
    recovery_s = max(restarts.values()) - killed_at
    print(f"\n[{kind}] SIGKILL recovery: every orphan restarted {recovery_s:.2f} s after the kill")
    assert recovery_s <= lease_s + scan_s + 3.0
    jobs = asyncio.run(_jobs(url, ids))
    assert {j.state for j in jobs} == {JobState.COMPLETED}
    assert {j.attempts for j in jobs} == {2}


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_sigterm_with_long_jobs_exits_within_grace_and_the_released_jobs_start_at_once(
    kind: str, url_for: Any, tmp_path: Path, workers: Any
) -> None:
    url = url_for(kind)
    ledger = tmp_path / "ledger"
    grace_s = 2.0
    ids = asyncio.run(_enqueue(url, 6, 60.0))
    first = workers(url, ledger, "--grace", str(grace_s), "--concurrency", "4")
    first.wait_ready()
    wait_until(lambda: len(read_ledger(ledger)) == 4, 20, "4 jobs running")
    running = {r[0] for r in read_ledger(ledger)}

    signalled = time.monotonic()
    first.signal(signal.SIGTERM)
    first.wait_exit(grace_s + 10)
    exit_s = time.monotonic() - signalled
    print(f"\n[{kind}] SIGTERM with long jobs, grace {grace_s} s: exited in {exit_s:.2f} s")
    assert exit_s <= grace_s + 3.0
    jobs = asyncio.run(_jobs(url, ids))
    assert {j.state for j in jobs} == {JobState.QUEUED}
    assert {j.attempts for j in jobs} == {0}  # release charges nothing

    second = workers(url, ledger, "--concurrency", "10", CONVEYOR_TEST_SLEEP_SCALE="0.005")
    second.wait_ready()
    wait_until(lambda: asyncio.run(_count(url, JobState.COMPLETED)) == 6, 20, "all completed")
    second.signal(signal.SIGTERM)
    second.wait_exit(10)
    starts = {r[0]: r for r in read_ledger(ledger) if r[3] == "start" and r[2] == second.pid}
    assert set(starts) == set(ids)
    for job_id in running:
        assert starts[job_id][1] == 1  # still attempt 1: the release charged nothing
    delay_s = max(r[4] for r in starts.values()) - second.ready_at
    print(f"[{kind}] released jobs started {delay_s:.2f} s after the next worker was ready")
    assert delay_s < 2.0
    assert {j.attempts for j in asyncio.run(_jobs(url, ids))} == {1}


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_sigterm_with_an_empty_queue_exits_in_under_a_second(
    kind: str, url_for: Any, tmp_path: Path, workers: Any
) -> None:
    url = url_for(kind)
    worker = workers(url, tmp_path / "ledger")
    worker.wait_ready()
    time.sleep(0.3)  # idle: blocked on the broker
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(5) == 0
    exit_s = time.monotonic() - signalled
    print(f"\n[{kind}] SIGTERM with an empty queue: exited in {exit_s:.3f} s")
    assert exit_s < 1.0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_second_sigterm_stops_at_once_and_releases(
    url_for: Any, tmp_path: Path, workers: Any
) -> None:
    url = url_for("sqlite")
    ledger = tmp_path / "ledger"
    ids = asyncio.run(_enqueue(url, 2, 60.0))
    worker = workers(url, ledger, "--grace", "30")
    worker.wait_ready()
    wait_until(lambda: len(read_ledger(ledger)) == 2, 20, "2 jobs running")
    worker.signal(signal.SIGTERM)
    time.sleep(0.3)
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.wait_exit(5)
    assert time.monotonic() - signalled < 3.0
    jobs = asyncio.run(_jobs(url, ids))
    assert {j.state for j in jobs} == {JobState.QUEUED}
    assert {j.attempts for j in jobs} == {0}
