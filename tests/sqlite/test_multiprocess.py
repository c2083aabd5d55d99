"""Several processes on one SQLite file: no job reserved twice, no lock error reaching a caller."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.job import JobState

WORKER = Path(__file__).with_name("mp_worker.py")


def _wait_all(procs: list[subprocess.Popen[str]], timeout_s: float) -> str | None:
    """Wait for every process; on the first failure (or the timeout) stop the rest.

    Returns None when all exited with 0, else what went wrong with the failed one's stderr.
    """
    deadline = time.monotonic() + timeout_s
    try:
        while any(proc.poll() is None for proc in procs):
            for proc in procs:
                if proc.poll() not in (None, 0):
                    _, stderr = proc.communicate()
                    return f"a worker failed (exit {proc.returncode}):\n{stderr}"
            if time.monotonic() > deadline:
                return "workers did not finish in time"
            time.sleep(0.05)
        for proc in procs:
            _, stderr = proc.communicate()
            if proc.returncode != 0 or "locked" in stderr:
                return f"a worker failed (exit {proc.returncode}):\n{stderr}"
        return None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_processes_enqueuing_and_reserving_on_one_new_file_never_share_a_job(
    tmp_path: Path,
) -> None:
    n_procs, per_proc = 4, 300
    total = n_procs * per_proc
    url = f"sqlite:///{tmp_path / 'shared.db'}"

    def out(i: int) -> str:
        return str(tmp_path / f"p{i}.json")

    # not created yet: the processes race to create it
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, f"p{i}", str(per_proc), str(total), out(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_procs)
    ]
    failed = _wait_all(procs, timeout_s=50)
    assert failed is None, failed

    reports = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(n_procs)]
    reserved = [job_id for report in reports for job_id in report["reserved"]]
    assert len(reserved) == len(set(reserved)) == total  # each job reserved exactly once
    expected = {f"p{i}-{k}" for i in range(n_procs) for k in range(per_proc)}
    assert set(reserved) == expected
    assert sorted(j for r in reports for j in r["enqueued"]) == sorted(expected)
    # work was actually shared: every process reserved something
    assert all(report["reserved"] for report in reports)

    async def check() -> None:
        async with SQLiteBroker(str(tmp_path / "shared.db")) as broker:
            counts = (await broker.counts("mp"))["mp"]
            assert counts[JobState.COMPLETED] == total
            assert sum(counts.values()) == total
            for i, report in enumerate(reports):
                for job_id in report["reserved"][:20]:
                    job = await broker.get(job_id)
                    assert job is not None
                    assert (job.result, job.worker_id, job.attempts) == (f"p{i}", f"p{i}", 1)

    asyncio.run(check())
