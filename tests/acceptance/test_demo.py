"""``python -m conveyor.demo`` (what ``make demo`` runs) ends by itself with a correct summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_every_job_to_its_end_and_summarises(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_FAST": "1"}
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.demo"],
        cwd=tmp_path,  # the demo writes ./conveyor-demo.db
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out, proc.stderr)
    assert "Traceback" not in proc.stderr
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
