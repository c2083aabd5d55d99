"""The ``conveyor`` CLI end to end: real subprocesses against a SQLite file in tmp_path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

TASKS_MODULE = textwrap.dedent(
    """
    from conveyor import Conveyor, JobContext

    app = Conveyor()  # the worker command's --broker overrides this app's URL


    @app.task(name="t.add")
    async def add(ctx: JobContext, a: int, b: int) -> int:
        ctx.progress(50, "adding")
        ctx.log(f"adding {a} and {b}")
        return a + b


    @app.task(name="t.broken")
    async def broken(ctx: JobContext) -> None:
        raise RuntimeError("always broken")


    @app.task(name="t.stubborn")
    async def stubborn(ctx: JobContext) -> None:
        import asyncio
        while True:  # swallows every cancellation: only leaving the process stops it
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass
    """
)


class Cli:
    """Runs ``conveyor`` as a subprocess with ``--broker`` pointing at this test's database."""

    def __init__(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path / 'cli.db'}"
        (tmp_path / "clitasks.py").write_text(TASKS_MODULE)
        self.env = {**os.environ, "PYTHONPATH": str(tmp_path), "CONVEYOR_URL": self.url}
        self.env.pop("COLUMNS", None)
        self.cwd = tmp_path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "conveyor.cli.main", "--broker", self.url, *args]

    def __call__(
        self, *args: str, ok: bool = True, stdin: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=timeout,
            check=False,
        )
        if ok:
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def enqueue(self, *args: str) -> str:
        return self("enqueue", *args).stdout.strip()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_enqueued_jobs_are_listed_run_by_a_burst_worker_and_dead_letters_redriven(cli: Cli) -> None:
    add_id = cli.enqueue("t.add", "--args", "[2, 3]", "--priority", "high")
    # --max-attempts: a producer that does not import the task cannot know its options
    broken_id = cli.enqueue("t.broken", "--max-attempts", "1")
    listed = cli.json("jobs", "list")["jobs"]
    assert {j["id"]: j["state"] for j in listed} == {add_id: "queued", broken_id: "queued"}
    table = cli("jobs", "list").stdout
    assert add_id in table
    assert "t.add" in table

    worker = cli("worker", "clitasks", "--burst", "--log-level", "warning", timeout=60)
    assert "Traceback" not in worker.stderr

    shown = cli.json("jobs", "show", add_id)
    assert (shown["state"], shown["result"], shown["attempts"]) == ("completed", 5, 1)
    assert "adding 2 and 3" in cli("jobs", "logs", add_id).stdout
    details = cli("jobs", "show", broken_id).stdout
    assert "failed" in details
    assert "RuntimeError" in details

    dead = cli.json("dead-letters", "list")["jobs"]
    assert [j["id"] for j in dead] == [broken_id]
    assert "always broken" in dead[0]["error"]
    assert "re-drove 1 job" in cli("dead-letters", "redrive", "default").stdout
    assert cli.json("jobs", "show", broken_id)["state"] == "queued"


def test_cancel_retry_and_delete_one_job(cli: Cli) -> None:
    job_id = cli.enqueue("t.add", "--args", "[1, 1]", "--delay", "600")
    assert cli.json("jobs", "show", job_id)["state"] == "scheduled"
    assert cli("jobs", "cancel", job_id).stdout.split() == [job_id, "stopped"]
    assert_one_line_error(cli("jobs", "cancel", job_id, ok=False), "stopped")
    assert cli("jobs", "retry", job_id).stdout.split() == [job_id, "queued"]
    assert cli.json("jobs", "show", job_id)["state"] == "queued"
    cli("jobs", "delete", job_id)
    assert_one_line_error(cli("jobs", "show", job_id, ok=False), job_id)


def test_queues_counts_and_purge_asks_unless_yes(cli: Cli) -> None:
    cli.enqueue("t.add", "--args", "[1, 2]", "--queue", "q1")
    cli.enqueue("t.add", "--args", "[3, 4]", "--queue", "q1", "--pending")
    counts = cli.json("queues")
    assert counts["q1"]["queued"] == 1
    assert counts["q1"]["pending"] == 1
    refused = cli("purge", "q1", stdin="n\n", ok=False)
    assert refused.returncode == 1
    assert cli.json("queues")["q1"]["queued"] == 1
    assert "purged 2 jobs" in cli("purge", "q1", "--yes").stdout
    assert sum(cli.json("queues")["q1"].values()) == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--broker", "ftp://nowhere", "queues"), ("scheme",)),
        (("enqueue", "t.add", "--args", "[1, "), ("--args", "JSON")),
        (("enqueue", "t.add", "--kwargs", "[1]"), ("--kwargs", "object")),
        (("jobs", "show", "no-such-job"), ("no-such-job",)),
        (("worker", "no_such_module_xyz"), ("no_such_module_xyz",)),
    ],
    ids=["bad-scheme", "bad-args-json", "kwargs-not-object", "unknown-job", "unknown-module"],
)
def test_bad_input_is_one_clear_line_without_traceback(
    cli: Cli, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    assert_one_line_error(cli(*args, ok=False), *words)


def test_enqueue_wait_prints_result_and_sigterm_stops_the_worker_promptly(cli: Cli) -> None:
    worker = subprocess.Popen(
        cli.argv("worker", "clitasks", "--log-level", "warning"),
        env=cli.env,
        cwd=cli.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waited = cli("enqueue", "t.add", "--args", "[20, 22]", "--wait", "--timeout", "30")
        job_id, result = waited.stdout.split()
        assert result == "42"
        assert cli.json("jobs", "show", job_id)["state"] == "completed"
        sent = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=10)
        assert time.monotonic() - sent < 5
        assert worker.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()


def test_sigterm_exits_within_grace_even_if_a_job_ignores_cancellation(cli: Cli) -> None:
    job_id = cli("enqueue", "t.stubborn").stdout.strip()
    worker = subprocess.Popen(
        cli.argv("worker", "clitasks", "--grace-period", "1", "--log-level", "warning"),
        env=cli.env,
        cwd=cli.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while cli.json("jobs", "show", job_id)["state"] != "running":
            assert time.monotonic() < deadline, "the stubborn job never started"
            time.sleep(0.1)
        sent = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=15)
        # grace 1 s, then the bounded wait for leftovers (1 s); asyncio.run would wait forever
        assert time.monotonic() - sent < 1 + 1 + 3, stderr
        assert worker.returncode == 0, stderr
        assert "ignored cancellation" in stderr
        assert "Traceback" not in stderr
        # released on the way out (no attempt charged), so another worker can run it at once
        job = cli.json("jobs", "show", job_id)
        assert job["state"] == "queued"
        assert job["attempts"] == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
