"""``conveyor serve`` end to end: a real process with in-process workers, stopped by a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from conveyor.testing.redis_server import free_port

TASKS = textwrap.dedent(
    """
    from conveyor import Conveyor, JobContext

    app = Conveyor()


    @app.task(name="t.add")
    async def add(ctx: JobContext, a: int, b: int) -> int:
        ctx.progress(50, "adding")
        ctx.log(f"adding {a} and {b}")
        return a + b
    """
)


def test_serve_runs_workers_for_the_app_and_stops_on_sigint(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(TASKS)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CONVEYOR_TOKEN": "tok"}
    command = [
        sys.executable,
        "-m",
        "conveyor.cli.serve",
        "--broker",
        f"sqlite:///{tmp_path / 'serve.db'}",
        "--app",
        "tasks:app",
        "--workers",
        "1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        headers = {"authorization": "Bearer tok"}
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.1)
        assert httpx.get(f"{base}/jobs", timeout=5).status_code == 401
        job_id = httpx.post(
            f"{base}/jobs", json={"task": "t.add", "args": [2, 3]}, headers=headers, timeout=5
        ).json()["job_id"]
        while True:
            job = httpx.get(f"{base}/jobs/{job_id}", headers=headers, timeout=5).json()
            if job["state"] == "completed":
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["result"] == 5
        logs = httpx.get(f"{base}/jobs/{job_id}/logs", headers=headers, timeout=5).json()
        assert logs["lines"] == ["adding 2 and 3"]
        health = httpx.get(f"{base}/health", timeout=5).json()
        assert health["workers"][0]["healthy"] is True
        process.send_signal(signal.SIGINT)
        process.wait(20)
        stderr = process.stderr.read() if process.stderr else ""
        assert "Traceback" not in stderr, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
