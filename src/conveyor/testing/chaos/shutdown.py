"""Graceful-shutdown scenarios S1, S3, S4, S5 (reliability plan 7.2).

* S1: SIGTERM with many short jobs in flight: all finish, the worker exits within 2 s of the
  last one, nothing lost, nothing run twice.
* S3: jobs that ignore cancellation in each executor (async swallows CancelledError, thread
  sleeps, process spins): the worker still exits within grace + 5 s; the next worker completes
  those jobs (released at shutdown, or recovered by lease expiry).
* S4: two signals at random moments (SIGTERM twice, SIGINT then SIGTERM, SIGTERM during start-up
  before the handlers exist, then SIGTERM): the worker is gone within 3 s of the second, and so
  are its process children. The three cases run side by side, each on its own queue.
* S5: SIGTERM while the broker is unreachable (Redis killed; SQLite locked by a ``BEGIN
  EXCLUSIVE`` elsewhere): exit within grace + 5 s; once the broker is back a new worker
  completes everything.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from conveyor.job import JobState
from conveyor.testing.chaos import tasks
from conveyor.testing.chaos.crash import alive, child_pids, enqueue_each, enqueue_tasks
from conveyor.testing.chaos.scenarios import FAST_OPTS, GRACE_S, Env, Scenario, wait_until
from conveyor.testing.faults import Child
from conveyor.testing.ledger import COMMITTED, END, START

ALL_EXECUTORS = ["--executors", "async,thread,process"]
#: The second signal must end the worker within this (plan 7.2, S4).
SECOND_SIGNAL_EXIT_S = 3.0
#: How long a worker's children may outlive it (their parent watch polls every 0.5 s).
ORPHAN_GRACE_S = 3.0


def _committed(env: Env, ids: list[str]) -> set[str]:
    wanted = set(ids)
    return {r["id"] for r in env.records(COMMITTED) if r["id"] in wanted}


def _runs_end_at_exit(env: Env, ids: list[str], t_exit: float, name: str) -> None:
    """Record that the open runs of ``ids`` ended at ``t_exit`` with their (gone) processes.

    One fault per process, so that the checker does not take a later run for an overlap.
    """
    wanted = set(ids)
    ended = {(r["id"], r["pid"]) for r in env.records(END) if r["id"] in wanted}
    pids = {r["pid"] for r in env.records(START) if r["id"] in wanted and r["t"] <= t_exit}
    for pid in sorted(pids):
        open_runs = [r for r in env.records(START, pid) if (r["id"], pid) not in ended]
        if open_runs:
            env.driver.record_fault(name, pid=pid, t=t_exit)


def _drain(
    env: Env, ids: list[str], queues: str, *, processes: bool = True, timeout_s: float = 30.0
) -> Child:
    """A fresh worker at sleep scale 0.002 that completes ``ids``; stopped once it has."""
    executors = [*ALL_EXECUTORS, "--process", "1"] if processes else []
    worker = env.worker(*FAST_OPTS, *executors, "--queues", queues, **{tasks.SCALE_ENV: "0.002"})
    env.ready(worker, timeout_s=40)
    wait_until(lambda: len(_committed(env, ids)) >= len(ids), timeout_s, "all jobs completed")
    env.terminate(worker, GRACE_S + 8)
    return worker


# -- S1 --------------------------------------------------------------------------------------------


def s1_short_jobs(env: Env, size: int) -> None:
    """S1: SIGTERM with many short jobs in flight: all complete; exit <= last job end + 2 s."""
    n = 40 * size
    rng = random.Random()
    ids = enqueue_each(env, tasks.SLEEP, [[round(rng.uniform(0.1, 1.0), 3)] for _ in range(n)])
    worker = env.worker("--grace", "10", "--concurrency", str(n + 10))
    env.ready(worker)
    wait_until(lambda: len(env.records(START)) >= n, 20, f"{n} jobs in flight")
    t_term = time.time()
    exit_s = env.terminate(worker, 15.0)
    ends = [r for r in env.records(END, worker.pid) if r["id"] in set(ids)]
    ok = {r["id"] for r in ends if r["outcome"] == "ok"}
    env.outcome.goal(ok == set(ids), f"{n - len(ok)} job(s) did not finish after SIGTERM")
    env.outcome.goal(_committed(env, ids) == set(ids), "not every job was committed")
    if ends:
        after_last = t_term + exit_s - max(r["t"] for r in ends)
        env.outcome.goal(after_last <= 2.0, f"exit {after_last:.2f} s after the last job (> 2)")
    report = env.check()
    env.outcome.goal(not report.dup_exec, f"dup_exec={len(report.dup_exec)}")


# -- S3 --------------------------------------------------------------------------------------------


def s3_stubborn(env: Env, size: int) -> None:
    """S3: jobs ignoring cancellation in all three executors: exit <= grace + 5 s; recovered."""
    ids = enqueue_tasks(env, tasks.STUBBORN_ASYNC, [600.0], 2 * size)
    ids += enqueue_tasks(env, tasks.STUBBORN_THREAD, [600.0], 2 * size)
    ids += enqueue_tasks(env, tasks.STUBBORN_PROC, [600.0], size)
    queues = f"{tasks.STUBBORN_ASYNC_QUEUE},{tasks.STUBBORN_THREAD_QUEUE},{tasks.PROCESS_QUEUE}"
    worker = env.worker(
        *FAST_OPTS, *ALL_EXECUTORS, "--grace", str(GRACE_S), "--process", str(size),
        "--threads", str(2 * size), "--queues", queues,
    )  # fmt: skip
    env.ready(worker, timeout_s=40)
    wait_until(lambda: len(env.records(START)) >= len(ids), 20, "every stubborn job running")
    t_term = time.time()
    exit_s = env.terminate(worker, GRACE_S + 15)
    env.outcome.goal(exit_s <= GRACE_S + 5, f"exit {exit_s:.2f} s > grace+5 = {GRACE_S + 5} s")
    _runs_end_at_exit(env, ids, t_term + exit_s, "exit-abandoning-runs")
    left = env.states(ids)
    leased = sum(1 for j in left.values() if j is not None and j.state is JobState.RUNNING)
    released = sum(1 for j in left.values() if j is not None and j.state is JobState.QUEUED)
    env.outcome.goal(leased + released == len(ids), "a stubborn job is neither released nor leased")
    t_expired = t_term + exit_s + 2.0  # lease 2 s: by then a leased job is recoverable
    _drain(env, ids, queues)
    env.check()
    reruns = {r["id"]: r for r in env.records(START) if r["id"] in set(ids) and r["t"] > t_term}
    env.outcome.goal(set(reruns) == set(ids), "a stubborn job was not run again after the exit")
    for job_id, job in left.items():
        if job is not None and job.state is JobState.RUNNING and job_id in reruns:
            # A job left leased may only run again once its lease expired.
            env.outcome.goal(reruns[job_id]["t"] >= t_expired - 0.5, f"{job_id} rerun while leased")


# -- S4 --------------------------------------------------------------------------------------------


@dataclass
class _SignalCase:
    """One S4 case run in its own thread: what was sent, when it exited, its children."""

    name: str
    first: signal.Signals
    startup: bool = False
    exit_after_second_s: float | None = None
    seen_children: set[int] = field(default_factory=set)
    orphans: list[int] = field(default_factory=list)
    error: str | None = None


def _run_signal_case(env: Env, case: _SignalCase, queue: str, rng: random.Random) -> None:
    worker = env.worker(
        *ALL_EXECUTORS, "--process", "2", "--grace", "10", "--queues", f"{queue}",
    )  # fmt: skip
    stop_watch = threading.Event()

    def watch() -> None:  # every child the worker ever had, including ones spawned late
        while not stop_watch.is_set() and worker.alive:
            case.seen_children.update(child_pids(worker.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        if case.startup:
            # Somewhere in start-up: before the interpreter is up, during imports, or while the
            # executors start (handlers are installed only once the worker runs).
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            if not worker.wait_ready(40):
                case.error = "worker not ready"
                return
            time.sleep(rng.uniform(0.0, 0.5))
        worker.signal(case.first)
        time.sleep(rng.uniform(0.05, 1.0))
        t_second = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = worker.wait_exit(SECOND_SIGNAL_EXIT_S + 7)
        if code is None:
            env.driver.record_hang(f"{case.name}: worker alive 10 s after its second signal")
            worker.kill(dump=True)
        else:
            case.exit_after_second_s = time.monotonic() - t_second
    finally:
        stop_watch.set()
        watcher.join(2.0)
    # A process child notices its parent's death within 0.5 s (it polls getppid) once it runs
    # its main loop; one still importing (start-up cases) takes longer on a loaded machine.
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while (left := [pid for pid in case.seen_children if alive(pid)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    case.orphans = left


def s4_two_signals(env: Env, size: int) -> None:
    """S4: two signals at random moments: gone <= 3 s after the second, no orphaned children."""
    rng = random.Random()
    ids: list[str] = []
    for _ in range(size):
        cases = [
            _SignalCase("SIGTERM+SIGTERM", signal.SIGTERM),
            _SignalCase("SIGINT+SIGTERM", signal.SIGINT),
            _SignalCase("startup SIGTERM+SIGTERM", signal.SIGTERM, startup=True),
        ]
        threads = []
        for i, case in enumerate(cases):
            queue = f"s4-{len(ids)}-{i}"
            # Long jobs in flight in the async and the process executor: the grace period would
            # wait for them; the second signal must not.
            ids += enqueue_tasks(env, tasks.SLEEP, [30.0], 3, queue=queue)
            ids += enqueue_tasks(env, tasks.PROC_SLEEP, [30.0], 2, queue=queue)
            seed = rng.random()
            threads.append(
                threading.Thread(
                    target=_run_signal_case, args=(env, case, queue, random.Random(seed))
                )
            )
        for t in threads:
            t.start()
        for t in threads:
            t.join(60.0)
        for case in cases:
            env.outcome.goal(case.error is None, f"{case.name}: {case.error}")
            took = case.exit_after_second_s
            if took is not None:
                env.outcome.exit_s.append(took)
            env.outcome.goal(
                took is not None and took <= SECOND_SIGNAL_EXIT_S,
                f"{case.name}: exit {took} s after the second signal (> {SECOND_SIGNAL_EXIT_S})",
            )
            env.outcome.goal(not case.orphans, f"{case.name}: orphaned children {case.orphans}")
    _runs_end_at_exit(env, ids, time.time(), "second-signal-exit")
    queues = sorted({j.queue for j in env.states(ids).values() if j is not None})
    _drain(env, ids, ",".join(queues))
    env.check()


# -- S5 --------------------------------------------------------------------------------------------


def s5_broker_down(env: Env, size: int) -> None:
    """S5: SIGTERM with the broker unreachable: exit <= grace + 5 s; all done once it is back."""
    ids: list[str] = []
    queues: list[str] = []
    for round_no in range(size):
        # One queue per round: each job meets the fault once (a job whose worker vanishes three
        # times is dead-lettered as poison by design; repeating the fault on it tests that).
        queue = f"s5-{round_no}"
        queues.append(queue)
        batch = enqueue_tasks(env, tasks.SLEEP, [30.0], 5, queue=queue)
        ids += batch
        worker = env.worker(*FAST_OPTS, "--grace", str(GRACE_S), "--queues", queue)
        env.ready(worker)
        wait_until(lambda b=batch: _started(env, b), 20, "the jobs running")  # type: ignore[misc]
        with _broker_unreachable(env):
            time.sleep(0.5)  # let the worker notice (its heartbeat fails)
            exit_s = env.terminate(worker, GRACE_S + 15)
            env.outcome.goal(
                exit_s <= GRACE_S + 5, f"exit {exit_s:.2f} s > grace+5 = {GRACE_S + 5} s"
            )
        worker.close()
    _drain(env, ids, ",".join(queues), processes=False)
    env.check()


def _started(env: Env, ids: list[str]) -> bool:
    return set(ids) <= {r["id"] for r in env.records(START)}


class _broker_unreachable:
    """The broker is unreachable inside the ``with`` block.

    Redis: SIGKILL the server (restarted on exit; AOF keeps the data). SQLite: another
    connection holds ``BEGIN EXCLUSIVE`` (rolled back on exit).
    """

    def __init__(self, env: Env) -> None:
        self.env = env
        self.lock: sqlite3.Connection | None = None

    def __enter__(self) -> None:
        if self.env.redis is not None:
            self.env.driver.record_fault("redis-sigkill")
            self.env.redis.kill()
        else:
            path = self.env.url.removeprefix("sqlite:///")
            self.lock = sqlite3.connect(path, timeout=10.0, isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")
            self.env.driver.record_fault("sqlite-exclusive-lock")

    def __exit__(self, *exc: object) -> None:
        if self.env.redis is not None:
            self.env.redis.start()
        elif self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()
        self.env.driver.record_heal("broker-back")


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "S1": (s1_short_jobs, ("sqlite", "redis")),
    "S3": (s3_stubborn, ("sqlite", "redis")),
    "S4": (s4_two_signals, ("sqlite", "redis")),
    "S5": (s5_broker_down, ("sqlite", "redis")),
}

__all__ = ["SCENARIOS"]
