"""Schemathesis against a real ``conveyor serve``: every phase, stateful included, then a summary.

Starts ``conveyor serve`` on a free loopback port with a bearer token, a SQLite broker in a
temporary directory and one in-process worker (running ``fuzz_app``'s task, so jobs really move
through their states), then runs ``schemathesis run`` with the examples, coverage, fuzzing and
stateful phases and the server-error and conformance checks, and prints what it did::

    python fuzz/schemathesis_run.py                    # >= 10,000 cases (a few minutes)
    python fuzz/schemathesis_run.py --max-examples 20  # a quick look

Exits non-zero if any check failed or fewer cases than ``--min-cases`` ran.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "use_after_free",
    "ensure_resource_availability",
)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(workdir: Path, port: int, token: str, workers: int) -> subprocess.Popen[bytes]:
    """``conveyor serve`` on ``port``; returns once ``/health`` answers."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "CONVEYOR_URL": f"sqlite:///{workdir / 'fuzz.db'}",
    }
    command = [
        sys.executable,
        "-c",
        "from conveyor.cli.main import main; main()",
        "serve",
        "--broker",
        env["CONVEYOR_URL"],
        "--app",
        "fuzz_app:app",
        "--workers",
        str(workers),
        "--port",
        str(port),
        "--token",
        token,
        "--rate-limit",
        "0",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    log = (workdir / "server.log").open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"conveyor serve exited with {server.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("conveyor serve did not answer /health within 30 s")


def stop_server(server: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 15 s; the exit code."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def run_schemathesis(args: argparse.Namespace, port: int, token: str, report: Path) -> int:
    """``schemathesis run`` against the server; its exit code."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    command = [
        st,
        "run",
        f"http://127.0.0.1:{port}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--phases",
        args.phases,
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(args.max_examples),
        "--workers",
        str(args.workers),
        "--exclude-path",
        "/events",  # an endless stream: tests/service/test_events.py covers it
        "--request-timeout",
        "10",
        "--continue-on-failure",
        "--suppress-health-check",
        "all",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
    ]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    # cwd: schemathesis keeps a cache directory (.schemathesis/) where it runs; keep it temporary
    return subprocess.call(
        command, cwd=report.parent, stdout=None if args.verbose else subprocess.DEVNULL
    )


def summarize(report: Path) -> dict[str, Any]:
    """Cases, per-phase cases, and failures by check from the ndjson event stream."""
    cases: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    for line in report.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a run that was cut short
        for kind, body in event.items():
            if kind == "ScenarioFinished":
                phase = body.get("phase", "?")
                recorder = body.get("recorder") or {}
                for case_id, case in (recorder.get("cases") or {}).items():
                    del case_id, case
                    cases[phase] += 1
                for interaction in (recorder.get("interactions") or {}).values():
                    response = interaction.get("response") or {}
                    if "status_code" in response:
                        statuses[response["status_code"]] += 1
                for check_list in (recorder.get("checks") or {}).values():
                    for check in check_list:
                        if check.get("status") == "failure":
                            failures[check.get("name", "?")] += 1
            elif kind == "NonFatalError":
                errors.append(str(body.get("info", body))[:300])
    return {
        "cases": sum(cases.values()),
        "by_phase": dict(cases),
        "statuses": dict(sorted(statuses.items())),
        "failures": dict(failures),
        "errors": errors,
    }


def main() -> int:
    """Parse the options, run, print the summary; 0 when clean and big enough."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--summarize", type=Path, help="only summarize an events.ndjson of an earlier run"
    )
    parser.add_argument("--max-examples", type=int, default=750, help="cases per operation")
    parser.add_argument("--min-cases", type=int, default=10_000, help="fail if fewer ran")
    parser.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="schemathesis threads (more than 1 trips CPython 3.11 ast.parse thread bug)",
    )
    parser.add_argument("--server-workers", type=int, default=1, help="in-process job workers")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="show schemathesis' own output")
    args = parser.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize), indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="conveyor-fuzz-") as tmp:
        workdir = Path(tmp)
        port, token = free_port(), secrets.token_urlsafe(16)
        server = start_server(workdir, port, token, args.server_workers)
        started = time.monotonic()
        try:
            code = run_schemathesis(args, port, token, workdir / "events.ndjson")
        finally:
            server_code = stop_server(server)
        summary = summarize(workdir / "events.ndjson")
        summary.update(
            schemathesis_exit=code,
            server_exit=server_code,
            seconds=round(time.monotonic() - started, 1),
        )
        server_log = (workdir / "server.log").read_text(errors="replace")
        tracebacks = server_log.count("Traceback")
    summary["server_tracebacks"] = tracebacks
    print(json.dumps(summary, indent=2))
    ok = not summary["failures"] and summary["cases"] >= args.min_cases and code == 0
    print(f"schemathesis: {summary['cases']} cases, failures {summary['failures'] or 'none'}")
    return 0 if ok and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
