"""``python -m conveyor.demo`` (what ``make demo`` runs): the batch and its summary, the dashboard
served while it runs and after, and a clean stop by itself with ``DEMO_SECONDS``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

SERVE_S = 8  # DEMO_SECONDS: long enough for the fast batch (about 2 s) on a slow machine
URL = re.compile(r"dashboard: (http://127\.0\.0\.1:\d+/)")


def _follow(
    proc: subprocess.Popen[str],
) -> tuple[int, list[str], list[httpx.Response], list[httpx.Response]]:
    """Read the demo's output to the end, calling its dashboard when it prints the URL."""
    watchdog = threading.Timer(55, proc.kill)
    watchdog.start()
    lines: list[str] = []
    during: list[httpx.Response] = []
    after: list[httpx.Response] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            found = URL.search(line)
            if found and not during:
                # Printed once the server is up, while the batch still runs.
                during.append(httpx.get(found[1], timeout=5))
                during.append(httpx.get(f"{found[1]}jobs", timeout=5))
            elif found and "serving for" in line:
                # After the summary it keeps serving (until DEMO_SECONDS here).
                after.append(httpx.get(f"{found[1]}queues", timeout=5))
        return proc.wait(10), lines, during, after
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_runs_every_job_serves_the_dashboard_and_stops_by_itself(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_FAST": "1", "DEMO_SECONDS": str(SERVE_S)}
    for name in ("COLUMNS", "CONVEYOR_TOKEN", "CONVEYOR_URL"):
        env.pop(name, None)
    started = time.monotonic()
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        with subprocess.Popen(
            [sys.executable, "-m", "conveyor.demo"],
            cwd=tmp_path,  # the demo writes ./conveyor-demo.db
            env=env,
            stdin=subprocess.DEVNULL,  # no TTY anywhere: it must not need one
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc:
            returncode, lines, during, after = _follow(proc)
        stderr.seek(0)
        errors = stderr.read()
    elapsed = time.monotonic() - started
    out = "".join(lines)
    assert returncode == 0, (out, errors)
    assert "Traceback" not in errors, errors

    summary = out[out.index("Summary") :]
    assert re.search(r"final states: completed 7 +failed 1 +stopped 1", summary), summary
    assert "retries: 3 (flaky fetch x2, charge invoice x1)" in summary
    assert "fetched https://rates.example.com on attempt 3" in summary
    assert re.search(r"dead letter: charge invoice after 2 attempts .*has no customer", summary)
    assert "stopped: build report, cancelled while running" in summary
    assert "priority: started high -> normal -> low" in summary
    assert "| chunk 5/5: running total" in summary  # the process job's printed output, captured
    # off a terminal nothing is redrawn: the table is printed once, in the summary
    assert out.count("conveyor demo") == 1
    assert (tmp_path / "conveyor-demo.db").exists()

    page, jobs = during
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "static/app.js" in page.text
    assert jobs.status_code == 200
    assert len(jobs.json()["jobs"]) == 9
    assert len(after) == 1, out  # the URL was printed again after the summary, while serving
    totals = after[0].json()["totals"]
    assert (totals["completed"], totals["failed"], totals["stopped"]) == (7, 1, 1)

    assert out.rstrip().endswith("stopping the server and its worker")
    assert SERVE_S <= elapsed < SERVE_S + 15, elapsed  # stopped by itself, promptly
    url = URL.search(out)
    assert url is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(url[1], timeout=2)  # nothing listens any more
