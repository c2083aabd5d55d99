"""``python -m conveyor.testing.chaos``: run the chaos scenarios and print one table.

    python -m conveyor.testing.chaos --runs 3
    python -m conveyor.testing.chaos --only K1,L3 --brokers redis --size 4
    python -m conveyor.testing.chaos --runs 3 --soak-minutes 30   # then the T6 soak, 30 min
    python -m conveyor.testing.chaos --full --runs 2 --soak-minutes 30   # what `make chaos` runs

The soak (T6) runs after the rounds, on every broker it applies to at once (one thread each),
for ``--soak-minutes``; without that option it runs only if ``--only`` names it (one minute).

Exit status 1 if any run missed a goal (lost, unexpected, dup_commit, overlap, hang, a timing
goal); the failures are listed under the table and each run's work directory (ledger, worker
stderr) is kept for failing runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from conveyor.testing.chaos import soak
from conveyor.testing.chaos.registry import SCENARIOS, full_size, run_scenario
from conveyor.testing.chaos.scenarios import Outcome
from conveyor.testing.redis_server import redis_server_binary

COLUMNS = (
    ("scenario", 8),
    ("broker", 7),
    ("runs", 5),
    ("lost", 5),
    ("unexp", 6),
    ("dup_exec", 9),
    ("dup_commit", 11),
    ("recovery p50/max s", 19),
    ("exit max s", 11),
    ("hangs", 6),
    ("ok", 5),
)


def _row(name: str, kind: str, outcomes: list[Outcome]) -> list[str]:
    rows = [o.report.as_row() for o in outcomes]
    recovery = [r for o in outcomes for r in o.recovery_s]
    exits = [e for o in outcomes for e in o.exit_s]
    passed = sum(o.ok for o in outcomes)
    return [
        name,
        kind,
        str(len(outcomes)),
        str(sum(r["lost"] for r in rows)),
        str(sum(r["unexpected"] for r in rows)),
        str(sum(r["dup_exec"] for r in rows)),
        str(sum(r["dup_commit"] for r in rows)),
        f"{statistics.median(recovery):.2f}/{max(recovery):.2f}" if recovery else "-",
        f"{max(exits):.2f}" if exits else "-",
        str(sum(r["hangs"] for r in rows)),
        f"{passed}/{len(outcomes)}",
    ]


def _print_table(results: dict[tuple[str, str], list[Outcome]]) -> None:
    print("  ".join(title.ljust(width) for title, width in COLUMNS))
    for (name, kind), outcomes in results.items():
        cells = _row(name, kind, outcomes)
        print("  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)))


def _record(
    outcome: Outcome,
    workdir: Path,
    args: argparse.Namespace,
    results: dict[tuple[str, str], list[Outcome]],
    failed_dirs: list[tuple[Outcome, Path]],
) -> None:
    """Add one run to the results, print its status line, keep its directory if it failed."""
    name, kind = outcome.scenario, outcome.broker
    results[(name, kind)].append(outcome)
    status = "ok" if outcome.ok else "FAIL"
    print(f"# {name} {kind} run {len(results[(name, kind)])}: {status}", flush=True)
    if args.json is not None:
        with args.json.open("a") as out:
            line = {"scenario": name, "broker": kind, **outcome.report.as_row()}
            line.update(recovery_s=outcome.recovery_s, exit_s=outcome.exit_s)
            line.update(failures=outcome.failures, notes=outcome.notes)
            out.write(json.dumps(line) + "\n")
    if outcome.ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not outcome.ok:
        failed_dirs.append((outcome, workdir))


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios ``--runs`` times, then the soak if asked; print the table."""
    parser = argparse.ArgumentParser(prog="python -m conveyor.testing.chaos")
    parser.add_argument("--runs", type=int, default=1, help="repetitions per scenario and broker")
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="then soak this long (T6)")
    parser.add_argument("--size", type=int, default=1, help="multiply the job counts")
    parser.add_argument(
        "--full", action="store_true", help="each scenario at its full-tier size (registry)"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario ids (default: all)")
    parser.add_argument("--brokers", default="", help="comma-separated broker kinds (default: all)")
    parser.add_argument("--json", type=Path, help="also write one JSON line per run here")
    parser.add_argument("--workdir", type=Path, help="keep every run's directory under this one")
    args = parser.parse_args(argv)

    only = [s for s in args.only.split(",") if s] or [n for n in SCENARIOS if n != "T6"]
    soak_kinds: list[str] = []
    if args.soak_minutes > 0 or "T6" in only:
        soak.SOAK_SECONDS = args.soak_minutes * 60 or soak.SOAK_SECONDS
        soak_kinds = list(SCENARIOS["T6"][1])
        only = [n for n in only if n != "T6"]
    brokers = {b for b in args.brokers.split(",") if b}
    have_redis = redis_server_binary() is not None
    plan = [
        (name, kind)
        for name in only
        for kind in SCENARIOS[name][1]
        if (not brokers or kind in brokers) and (kind != "redis" or have_redis)
    ]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="conveyor-chaos-"))
    results: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    failed_dirs: list[tuple[Outcome, Path]] = []
    for run in range(args.runs):
        for name, kind in plan:
            workdir = root / f"{name}-{kind}-{run}"
            size = full_size(name) if args.full else args.size
            outcome = run_scenario(name, kind, workdir, size)
            _record(outcome, workdir, args, results, failed_dirs)
    soak_kinds = [k for k in soak_kinds if (not brokers or k in brokers)]
    soak_kinds = [k for k in soak_kinds if k != "redis" or have_redis]
    if soak_kinds:
        minutes = soak.SOAK_SECONDS / 60
        print(f"# soak (T6): {minutes:.1f} min on {', '.join(soak_kinds)}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(len(soak_kinds)) as pool:
            dirs = {k: root / f"T6-{k}" for k in soak_kinds}
            futures = {k: pool.submit(run_scenario, "T6", k, dirs[k]) for k in soak_kinds}
            for kind, future in futures.items():
                _record(future.result(), dirs[kind], args, results, failed_dirs)
    if not have_redis:
        print("# redis-server not installed: Redis rows skipped", file=sys.stderr)
    _print_table(results)
    for (name, kind), outcomes in results.items():
        for outcome in outcomes:
            if outcome.notes:
                notes = ", ".join(f"{k} {v}" for k, v in outcome.notes.items())
                print(f"{name} {kind}: {notes}")
    for outcome, workdir in failed_dirs:
        print(f"FAILED {outcome.scenario} {outcome.broker} ({workdir}):")
        for failure in outcome.failures:
            print(f"  - {failure}")
    return 1 if failed_dirs else 0


if __name__ == "__main__":
    sys.exit(main())
