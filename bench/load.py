"""Load tests T1-T8 of reliability plan 7.7, sized for a 2-core machine, printed as one table.

    .venv/bin/python bench/load.py [--quick | --full] [--brokers memory,sqlite,redis]
                                   [--only T1,T3,...]

Rows (each against its goal from the plan; the figures depend on the machine and on what else
runs on it):

  T1  noop throughput: N pre-filled no-op jobs drained by one worker (async executor).
  T2  asyncio.sleep(1) x 10,000 at concurrency 10,000: wall time, event-loop lag p99.
  T3  HTTP POST /jobs on a real ``conveyor serve`` process (token set, rate limit out of the
      way) under wrk, keep-alive, 64 connections: req/s, p50/p99, 5xx.
  T4  enqueue->start latency at 50 % of the T1 rate (producer in its own process where the
      broker is shared between processes).
  T5  a 1,000,000-job backlog (SQLite, Redis): single enqueue and reserve+ack p99 vs an empty
      queue, and a worker process's peak RSS while it consumes from that backlog.
  T6  the soak: run by ``make chaos``.
  T7  overload: 3x the T3 rate offered for 30 s (``--full``: 5 min): refusals (429/503 with
      Retry-After) rather than timeouts, bounded server RSS, latency back to normal afterwards.
  T8  payloads 1 KiB / 64 KiB / 256 KiB / 1 MiB: jobs/s, and the 1 MiB cap over HTTP (413).

``--quick`` scales the job counts and durations down (T1 10,000 jobs, T5 100,000-job backlog) to
check the harness; its figures are not the plan's. T3 and T7 need ``wrk`` (Debian:
``apt-get install wrk``); without it their rows say so.
"""

# ruff: noqa: E402  (the imports follow the sys.path fix below)

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and its http.py would shadow the standard
# library's http package: import the bench modules as the ``bench`` package instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from bench.loadlib import http_rows, worker_rows
from bench.loadlib.common import Row
from bench.loadlib.wrk import have_wrk
from rich.console import Console
from rich.table import Table

from conveyor.testing.redis_server import redis_server_binary

# Piped (make, tee, CI), rich would fold the table to 80 columns: give it room.
console = Console(width=None if sys.stdout.isatty() else 150)
KIB = 1024


@dataclass(frozen=True)
class Scale:
    """How big each row runs."""

    t1_jobs: int
    t2_jobs: int
    t3_s: float
    t4_s: float
    t5_backlog: int
    t5_worker_s: float
    t7_s: float
    t8_sizes: list[tuple[str, int, int]]


SCALES = {
    "quick": Scale(
        10_000, 2_000, 3, 2, 100_000, 5, 10,
        [("1 KiB", KIB, 200), ("64 KiB", 64 * KIB, 100), ("256 KiB", 256 * KIB, 100),
         ("1 MiB", 1024 * KIB, 20)],
    ),
    "default": Scale(
        100_000, 10_000, 10, 5, 1_000_000, 15, 30,
        [("1 KiB", KIB, 2_000), ("64 KiB", 64 * KIB, 500), ("256 KiB", 256 * KIB, 500),
         ("1 MiB", 1024 * KIB, 100)],
    ),
}  # fmt: skip


class Runner:
    """Runs the selected rows, keeping going when one fails (its row says why)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = SCALES["quick" if args.quick else "default"]
        self.rows: list[Row] = []
        self.t1_rate: dict[str, float] = {}
        self.t3_rate: dict[str, float] = {}

    def brokers(self, *allowed: str) -> list[str]:
        """The requested brokers among ``allowed`` (Redis only if redis-server is installed)."""
        kinds = [k for k in self.args.brokers.split(",") if k in allowed]
        if "redis" in kinds and redis_server_binary() is None:
            console.print("[yellow]redis-server is not installed: Redis rows skipped[/yellow]")
            kinds.remove("redis")
        return kinds

    def wanted(self, row_id: str) -> bool:
        """Whether ``--only`` selects ``row_id``."""
        return not self.args.only or row_id in self.args.only.split(",")

    def attempt(self, row_id: str, kind: str, make: Callable[[str], list[Row]]) -> None:
        """Run one row for ``kind``; a failure becomes a row saying so."""
        console.print(f"[dim]{time.strftime('%H:%M:%S')} {row_id} {kind} ...[/dim]")
        try:
            self.rows += make(kind)
        except Exception as exc:
            if self.args.verbose:
                traceback.print_exc()
            why = f"{type(exc).__name__}: {exc}"[:200]
            self.rows.append(Row(row_id, "failed to run", kind, why, "-", False))

    def run(self) -> None:
        """Every selected row, in plan order (T4 uses T1's rate, T7 uses T3's)."""
        every, shared = ("memory", "sqlite", "redis"), ("sqlite", "redis")
        plan: list[tuple[str, tuple[str, ...], list[Callable[[str], list[Row]]]]] = [
            ("T1", every, [self._t1]),
            ("T2", every, [self._t2]),
            ("T3", every, [self._t3]),
            ("T4", every, [self._t4]),
            ("T5", shared, [self._t5]),
            ("T7", ("sqlite",), [self._t7]),
            ("T8", shared, [self._t8, self._t8_cap]),
        ]
        for row_id, kinds, makers in plan:
            if row_id == "T7" and self.wanted("T6"):
                soak = "soak 2 h, 50 % load, failures, SIGKILLs"
                self.rows.append(Row("T6", soak, "-", "see make chaos", "-", None))
            if not self.wanted(row_id):
                continue
            if row_id in ("T3", "T7") and not have_wrk():
                message = "wrk is not installed (Debian: apt-get install wrk)"
                console.print(f"[yellow]{row_id}: {message}[/yellow]")
                self.rows.append(Row(row_id, "HTTP under wrk", "-", message, "-", None))
                continue
            for kind in self.brokers(*kinds):
                for make in makers:
                    self.attempt(row_id, kind, make)

    def _t1(self, kind: str) -> list[Row]:
        row, rate = asyncio.run(worker_rows.t1_noop(kind, self.scale.t1_jobs))
        self.t1_rate[kind] = rate
        return [row]

    def _t2(self, kind: str) -> list[Row]:
        return [asyncio.run(worker_rows.t2_sleep(kind, self.scale.t2_jobs))]

    def _t3(self, kind: str) -> list[Row]:
        row, rate = http_rows.t3_http(kind, self.scale.t3_s)
        self.t3_rate[kind] = rate
        return [row]

    def _t4(self, kind: str) -> list[Row]:
        rate = 0.5 * self.t1_rate.get(kind, worker_rows.T1_GOALS[kind])
        return [asyncio.run(worker_rows.t4_latency(kind, rate, self.scale.t4_s))]

    def _t5(self, kind: str) -> list[Row]:
        s = self.scale
        return asyncio.run(worker_rows.t5_backlog(kind, s.t5_backlog, s.t5_worker_s))

    def _t7(self, kind: str) -> list[Row]:
        t3 = self.t3_rate.get(kind) or http_rows.T3_GOALS[kind][0]
        seconds = 300.0 if self.args.full else self.scale.t7_s
        return http_rows.t7_overload(kind, t3, seconds)

    def _t8(self, kind: str) -> list[Row]:
        return asyncio.run(http_rows.t8_payloads(kind, self.scale.t8_sizes))

    def _t8_cap(self, kind: str) -> list[Row]:
        return [http_rows.t8_http_cap(kind)]


def render(rows: list[Row], title: str) -> None:
    """The one table."""
    table = Table(title=title, show_lines=True)
    for name in ("id", "scenario", "broker", "figure(s)", "goal", "met?"):
        table.add_column(name, overflow="fold")
    marks = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "-"}
    for row in rows:
        table.add_row(row.id, row.scenario, row.broker, row.figures, row.goal, marks[row.met])
    console.print(table)


def main() -> None:
    """Parse the command line and run (or be a child process of a row)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: checks the harness")
    size.add_argument("--full", action="store_true", help="T7 overload for 5 min (not 30 s)")
    parser.add_argument("--brokers", default="memory,sqlite,redis", help="comma-separated kinds")
    parser.add_argument("--only", default="", help="comma-separated row ids, e.g. T1,T3")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--backlog-worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backlog_worker:
        asyncio.run(worker_rows.backlog_worker(args.backlog_worker, args.seconds))
        return
    started = time.monotonic()
    runner = Runner(args)
    runner.run()
    mode = "quick" if args.quick else "full" if args.full else "default"
    minutes = (time.monotonic() - started) / 60
    render(runner.rows, f"conveyor load (plan 7.7), {mode} mode, {minutes:.1f} min")


if __name__ == "__main__":
    main()
