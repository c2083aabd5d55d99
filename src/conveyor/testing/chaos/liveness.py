"""Liveness scenarios (reliability plan 7.4): a blocked loop, a GIL-holding job, a dead consumer.

* L1: an ``async`` job calls ``time.sleep`` for longer than two leases while 100 other jobs run
  on two workers: no lease may expire (the heartbeat renews from its own thread), so nothing
  runs twice; the blocked worker logs a loop-blocked warning within 2 s.
* L2: the same with a pure-Python CPU loop on the thread executor (it holds the GIL; the
  heartbeat thread gets it back at every switch interval).
* L4: the real ``conveyor worker`` command with ``--health-file``: its fetch loop is killed (task
  cancelled) in one worker and stuck (a round that never ends) in another, from inside the
  process by test-only tasks (:mod:`.blocking_tasks`); each health file must say unhealthy
  within 10 s while the process itself stays up (what a supervisor's probe acts on).

Two workers in L1/L2: a lease that expired because of the block would be taken over by the
other worker's reaper, which is what a false stall looks like (a second start in the ledger).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from conveyor.client import Conveyor
from conveyor.job import new_job_id
from conveyor.testing.chaos import blocking_tasks, tasks
from conveyor.testing.chaos.scenarios import GRACE_S, Env, Scenario, wait_until
from conveyor.testing.faults import Child
from conveyor.testing.ledger import COMMITTED, START

#: The warning the heartbeat thread logs while the worker's loop is blocked.
LOOP_BLOCKED_LOG = "the event loop has been blocked"
#: L4's goal: a dead or stuck consumer shows in the health file within this many seconds.
UNHEALTHY_GOAL_S = 10.0


# -- helpers shared with the broker-fault scenarios ------------------------------------------------


def enqueue_task(env: Env, task: str, *args: Any, queue: str | None = None) -> str:
    """Enqueue one job of ``task`` (committing through ``chaos.committed``); record it acked."""

    async def go(app: Conveyor) -> str:
        request = app.request(
            task, args=list(args), job_id=new_job_id(), queue=queue, on_success=tasks.COMMITTED
        )
        return (await app.enqueue_many([request]))[0].id

    job_id: str = env.run(go)
    env.producer.acked(job_id)
    return job_id


def cli_worker(env: Env, health_file: Path, *options: str, url: str | None = None) -> Child:
    """Start the real ``conveyor worker`` command on the chaos tasks, writing ``health_file``.

    It prints no ``ready`` line: wait for :func:`read_health` to say healthy instead.
    """
    n = len(env.children)
    child = Child(
        [
            sys.executable,
            "-m",
            "conveyor.cli.main",
            "worker",
            "conveyor.testing.chaos.blocking_tasks:cli_app",
            "--health-file",
            str(health_file),
            "--log-level",
            "warning",
            *options,
        ],
        env={"CONVEYOR_URL": url or env.url, tasks.LEDGER_ENV: str(env.ledger_dir)},
        stderr_path=env.dir / f"cli-worker-{n}.err",
    )
    env.children.append(child)
    return child


def read_health(path: Path) -> dict[str, Any] | None:
    """The worker's last health report, or None (no file yet, or not fresh: over 3 s old)."""
    try:
        report: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if time.time() - float(report.get("updated_at", 0.0)) > 3.0:
        return None  # a stale file means a dead (or frozen) process: not healthy either
    return report


def healthy(path: Path) -> bool:
    """Whether the health file is fresh and says healthy."""
    report = read_health(path)
    return bool(report and report.get("healthy"))


def _first_start(env: Env, job_id: str) -> dict[str, Any] | None:
    return next((r for r in env.records(START) if r["id"] == job_id), None)


def _sizes(size: int) -> tuple[float, float]:
    """(lease, block) seconds: the block outlasts two leases (fast) or is the plan's 30 s."""
    if size <= 1:
        return 1.5, 3.5
    return 10.0, 30.0


def _no_false_stall(env: Env) -> None:
    """Check the ledger: no job started twice, every start was attempt 1."""
    report = env.check()
    env.outcome.goal(not report.dup_exec, f"false stalls: {len(report.dup_exec)} job(s) ran twice")
    retried = [r["id"] for r in env.records(START) if r["attempt"] != 1]
    env.outcome.goal(not retried, f"{len(retried)} start(s) with attempt > 1 (a lease expired)")


# -- L1 / L2 ---------------------------------------------------------------------------------------


def l1_blocked_loop(env: Env, size: int) -> None:
    """L1: ``time.sleep`` in an async job blocks the loop past 2 leases: 0 duplicates, a warning."""
    lease, block_s = _sizes(size)
    # The heartbeat thread looks at the loop once per beat: the warning comes 1 s into the
    # block plus up to one heartbeat period (conveyor's default period is 0.25 s).
    opts = ["--lease", str(lease), "--heartbeat", str(min(0.5, lease / 4)), "--scan", "0.5"]
    workers = [env.worker(*opts, "--concurrency", "150") for _ in range(2)]
    for w in workers:
        env.ready(w)
    blocker = enqueue_task(env, blocking_tasks.BLOCK, block_s)
    others = env.enqueue(100, 1.0)
    wait_until(lambda: _first_start(env, blocker) is not None, 15, "the blocking job started")
    start = _first_start(env, blocker)
    assert start is not None
    victim = next(w for w in workers if w.pid == start["pid"])
    # The warning has no timestamp of its own: watch the stderr file for it to appear.
    seen_at = None
    deadline = start["t"] + block_s + 2.0
    while time.time() < deadline:
        if LOOP_BLOCKED_LOG in victim.stderr():
            seen_at = time.time()
            break
        time.sleep(0.05)
    if seen_at is None:
        env.outcome.goal(False, "no loop-blocked warning while the loop was blocked")
    else:
        lag = seen_at - start["t"]
        env.outcome.recovery_s.append(lag)
        env.outcome.goal(lag <= 2.0, f"loop-blocked warning {lag:.2f} s after the block (> 2 s)")
    total = len(others) + 1
    wait_until(lambda: env.completed() >= total, block_s + 30, "all jobs completed")
    for w in workers:
        env.terminate(w, GRACE_S + 8)
    _no_false_stall(env)


def l2_gil_hog(env: Env, size: int) -> None:
    """L2: a pure-Python CPU loop on the thread executor past 2 leases: 0 false stalls."""
    lease, spin_s = _sizes(size)
    if size > 1:
        spin_s = 60.0
    opts = ["--lease", str(lease), "--heartbeat", str(min(0.5, lease / 4)), "--scan", "0.5"]
    workers = [env.worker(*opts, "--concurrency", "100") for _ in range(2)]
    for w in workers:
        env.ready(w)
    spinner = enqueue_task(env, blocking_tasks.SPIN, spin_s)
    others = env.enqueue(50, 1.0)

    def spin_committed() -> bool:
        return any(r["id"] == spinner for r in env.records(COMMITTED))

    wait_until(spin_committed, spin_s + 30, "the CPU-bound job committed")
    wait_until(lambda: env.completed() >= len(others), 30, "the other jobs completed")
    for w in workers:
        env.terminate(w, GRACE_S + 8)
    _no_false_stall(env)


# -- L4 --------------------------------------------------------------------------------------------


def l4_dead_consumer(env: Env, size: int) -> None:
    """L4: a dead and a stuck fetch loop each show as unhealthy within 10 s; the process stays up.

    Two ``conveyor worker --health-file`` processes, each on a queue of its own so that each gets
    its own fault: in one the fetch loop task is cancelled, in the other its next round hangs.
    """
    faults = {"dead": blocking_tasks.KILL_FETCHER, "stuck": blocking_tasks.STALL_FETCHER}
    files = {name: env.dir / f"health-{name}.json" for name in faults}
    children = {
        name: cli_worker(env, files[name], "--queues", f"l4-{name}", "--lease", "2")
        for name in faults
    }
    wait_until(lambda: all(healthy(p) for p in files.values()), 20, "both workers healthy")
    del size  # one fault per worker: a worker whose consumer is gone has nothing left to test
    fault_ids = {name: enqueue_task(env, task, queue=f"l4-{name}") for name, task in faults.items()}
    started: dict[str, float] = {}
    detected: dict[str, float] = {}
    deadline = time.monotonic() + 15 + UNHEALTHY_GOAL_S
    while len(detected) < len(faults) and time.monotonic() < deadline:
        for name, job_id in fault_ids.items():
            if name not in started and (rec := _first_start(env, job_id)) is not None:
                started[name] = rec["t"]
            if name in started and name not in detected and not healthy(files[name]):
                detected[name] = time.time() - started[name]
        time.sleep(0.1)
    for name in faults:
        if name not in detected:
            env.outcome.goal(False, f"{name} fetch loop: health never turned unhealthy")
            continue
        took = detected[name]
        env.outcome.recovery_s.append(took)
        env.outcome.goal(
            took <= UNHEALTHY_GOAL_S, f"{name} fetch loop: unhealthy after {took:.2f} s (> 10 s)"
        )
        report = read_health(files[name])
        env.outcome.goal(
            children[name].alive and report is not None and report.get("state") == "running",
            f"{name} fetch loop: the process should stay up (and report), the probe's to act",
        )
        print(f"# L4 {env.kind} {name}: unhealthy {took:.2f} s after the fault; {report}")
    for name, child in children.items():
        exit_s = env.terminate(child, GRACE_S + 8)
        env.outcome.goal(exit_s <= GRACE_S + 3, f"{name} worker exit {exit_s:.2f} s after SIGTERM")


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "L1": (l1_blocked_loop, ("sqlite", "redis")),
    "L2": (l2_gil_hog, ("sqlite", "redis")),
    "L4": (l4_dead_consumer, ("sqlite",)),  # broker-agnostic; B3 covers Redis health
}

__all__ = ["SCENARIOS", "cli_worker", "enqueue_task", "healthy", "read_health"]
