"""The chaos scenarios (reliability plan section 7): real processes, real signals, one ledger each.

Every scenario takes a broker kind, a private work directory and a ``size`` (1 = the fast tier's
small counts) and returns an :class:`Outcome`: the ledger :class:`Report`, the figures it
measured and the goals it missed (``failures``; empty means it passed). Each one gets its own
broker: a SQLite file in the work directory or a private ``redis-server`` with
``appendfsync always``. Every wait is bounded; a process that overstays its exit budget is
stack-dumped (SIGUSR1), killed and counted as a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from conveyor.client import Conveyor
from conveyor.job import JobState, new_job_id
from conveyor.testing import faults
from conveyor.testing.chaos import tasks
from conveyor.testing.faults import Child, FaultProxy, Mode
from conveyor.testing.ledger import COMMITTED, START, Ledger, Producer, Report, check, read_records
from conveyor.testing.redis_cluster import RedisCluster
from conveyor.testing.redis_server import RedisServer

#: Short leases so that crash recovery is seconds; the goal scales with them (plan 7.0).
LEASE_S = 2.0
SCAN_S = 0.5
HEARTBEAT_S = 0.5
GRACE_S = 2.0
FAST_OPTS = ["--lease", str(LEASE_S), "--scan", str(SCAN_S), "--heartbeat", str(HEARTBEAT_S)]
RECOVERY_GOAL_S = LEASE_S + SCAN_S + 3.0
#: The worker's defaults (lease 10 s, scan 2 s): the full tier's K1 proves the plan's 15 s goal.
DEFAULT_LEASE_S, DEFAULT_SCAN_S = 10.0, 2.0
DEFAULT_RECOVERY_GOAL_S = DEFAULT_LEASE_S + DEFAULT_SCAN_S + 3.0
UNFINISHED = (JobState.QUEUED, JobState.RUNNING, JobState.SCHEDULED, JobState.PENDING)


@dataclass
class Outcome:
    """One run of one scenario on one broker."""

    scenario: str
    broker: str
    report: Report = field(default_factory=Report)
    recovery_s: list[float] = field(default_factory=list)
    exit_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Figures worth printing beside the table (the soak's memory and fd trend, say).
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every goal of the scenario held."""
        return not self.failures

    def goal(self, holds: bool, text: str) -> None:
        """Record ``text`` as a missed goal unless ``holds``."""
        if not holds:
            self.failures.append(text)


class Env:
    """A scenario's world: broker, ledger directory, driver ledger, and the children to clean up."""

    def __init__(self, kind: str, workdir: Path, outcome: Outcome) -> None:
        self.kind = kind
        self.dir = workdir
        self.ledger_dir = workdir / "ledger"
        self.outcome = outcome
        self.redis: RedisServer | None = None
        self.cluster: RedisCluster | None = None
        self.children: list[Child] = []
        self.driver = Ledger(self.ledger_dir, role="driver")
        self.producer = Producer(self.ledger_dir)
        if kind == "memory":
            self.url = "memory://"
        elif kind == "sqlite":
            self.url = f"sqlite:///{workdir / 'chaos.db'}"
        elif kind == "redis":
            # AOF with fsync on every write: an acknowledged enqueue survives a Redis SIGKILL.
            self.redis = RedisServer(appendfsync="always")
            self.redis.start()
            self.url = self.redis.url
        elif kind == "redis-cluster":
            # Three masters, so the scenario's queues and the global index span nodes.
            self.cluster = RedisCluster(appendfsync="always")
            self.cluster.start()
            self.url = self.cluster.url
        else:
            raise ValueError(f"unknown broker kind {kind!r}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for child in self.children:
            if child.alive:
                child.kill(dump=True)
            child.close()
        if self.redis is not None:
            self.redis.close()
        if self.cluster is not None:
            self.cluster.close()
        self.driver.close()
        self.producer.close()

    # -- processes -------------------------------------------------------------------------------

    def worker(self, *options: str, url: str | None = None, **env: str) -> Child:
        """Start a worker program (not yet waited for: call ``wait_ready``)."""
        n = len(self.children)
        child = Child(
            [sys.executable, "-m", "conveyor.testing.chaos.worker", *options],
            env={"CONVEYOR_URL": url or self.url, tasks.LEDGER_ENV: str(self.ledger_dir), **env},
            stderr_path=self.dir / f"worker-{n}.err",
        )
        self.children.append(child)
        return child

    def ready(self, child: Child, timeout_s: float = 20.0) -> None:
        """Wait for ``child`` to serve, or fail the scenario with its stderr."""
        if not child.wait_ready(timeout_s):
            child.kill(dump=True)
            raise RuntimeError(f"worker not ready in {timeout_s} s:\n{child.stderr()[-2000:]}")

    def terminate(self, child: Child, budget_s: float) -> float:
        """SIGTERM ``child``; its exit time (a hang is recorded if it overstays ``budget_s``)."""
        exit_s, hung = child.terminate_and_time(budget_s)
        if hung:
            self.driver.record_hang(f"worker {child.pid} did not exit {budget_s} s after SIGTERM")
        self.outcome.exit_s.append(exit_s)
        return exit_s

    # -- broker ----------------------------------------------------------------------------------

    def run(self, coro_fn: Callable[[Conveyor], Any]) -> Any:
        """Run ``coro_fn(app)`` on a fresh loop with a client of the scenario's broker."""

        async def main() -> Any:
            async with Conveyor(self.url) as app:
                return await coro_fn(app)

        return asyncio.run(main())

    def enqueue(self, n: int, seconds: float) -> list[str]:
        """Enqueue ``n`` ``chaos.sleep`` jobs and record each acknowledged id."""

        async def go(app: Conveyor) -> list[str]:
            handles = await app.enqueue_many([_request(app, seconds) for _ in range(n)])
            return [h.id for h in handles]

        ids: list[str] = self.run(go)
        self.producer.acked_many(ids)
        return ids

    def states(self, ids: list[str]) -> dict[str, Any]:
        """Each job's record (None if missing)."""

        async def go(app: Conveyor) -> dict[str, Any]:
            return {i: await app.get_job(i) for i in ids}

        result: dict[str, Any] = self.run(go)
        return result

    def drained(self) -> bool:
        """Whether no job is left to run (queued, scheduled, running or pending)."""

        async def go(app: Conveyor) -> bool:
            counts = await app.counts("default")
            return all(counts.get("default", {}).get(s, 0) == 0 for s in UNFINISHED)

        with contextlib.suppress(Exception):  # a broker still coming back: not drained yet
            return bool(self.run(go))
        return False

    def completed(self) -> int:
        """Jobs completed so far."""

        async def go(app: Conveyor) -> int:
            counts = await app.counts("default")
            return int(counts.get("default", {}).get(JobState.COMPLETED, 0))

        return int(self.run(go))

    # -- ledger ----------------------------------------------------------------------------------

    def records(self, kind: str = START, pid: int | None = None) -> list[dict[str, Any]]:
        """Ledger records of ``kind`` (by ``pid`` if given)."""
        return [
            r
            for r in read_records(self.ledger_dir)
            if r["k"] == kind and (pid is None or r["pid"] == pid)
        ]

    def check(self) -> Report:
        """The checker's report, with the broker's view; its problems become failures."""
        report = check(self.ledger_dir, self.url if self.kind != "memory" else None)
        self.outcome.report = report
        for problem in report.problems():
            self.outcome.failures.append(f"checker: {problem}")
        return report


def _request(app: Conveyor, seconds: float) -> Any:
    return app.request(tasks.SLEEP, args=[seconds], job_id=new_job_id(), on_success=tasks.COMMITTED)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; raise TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


# -- K: crash and kill -----------------------------------------------------------------------------


def k1_sigkill(env: Env, size: int) -> None:
    """K1: SIGKILL a worker with N jobs in flight, start another; nothing lost, quick recovery.

    The fast tier (size 1) uses the short lease; larger sizes (``make chaos``: 1,000 in flight)
    run the worker with its default lease and scan interval and hold it to the plan's 15 s.
    """
    n = 50 * size
    short = size < 4
    jobs_s = 3.0 if short else 8.0
    ids = env.enqueue(n, jobs_s)
    opts = [*(FAST_OPTS if short else []), "--concurrency", str(n + 10)]
    goal_s = RECOVERY_GOAL_S if short else DEFAULT_RECOVERY_GOAL_S
    first = env.worker(*opts)
    env.ready(first)
    wait_until(lambda: len(env.records(START)) >= n, 30 + n / 50, f"{n} jobs in flight")
    env.driver.record_fault("sigkill", pid=first.pid)
    faults.sigkill(first.pid)
    env.outcome.goal(first.wait_exit(5) is not None, "killed worker did not die")
    second = env.worker(*opts)
    env.ready(second)
    wait_until(lambda: env.completed() >= n, 40 + goal_s + n / 50, "all jobs completed")
    env.terminate(second, GRACE_S + 8)
    report = env.check()
    _recovery_goal(env, report, goal_s)
    env.outcome.goal(len(report.dup_exec) <= n, "dup_exec above the jobs in flight at the kill")
    jobs = env.states(ids)
    env.outcome.goal(
        all(j is not None and j.attempts == 2 for j in jobs.values()),
        "each orphan should be charged exactly one attempt (attempts == 2)",
    )


def k2_survivor(env: Env, size: int) -> None:
    """K2: two workers, SIGKILL one; the survivor adopts its orphans, never overlapping a lease."""
    n = 40 * size
    env.enqueue(n, 3.0)
    conc = ["--concurrency", str(n // 2)]  # each can hold only half: both get work
    a = env.worker(*FAST_OPTS, *conc)
    b = env.worker(*FAST_OPTS, *conc)
    env.ready(a)
    env.ready(b)
    wait_until(lambda: len(env.records(START)) >= n, 30, f"{n} jobs in flight")
    env.outcome.goal(len(env.records(START, a.pid)) > 0, "the victim held no job")
    env.driver.record_fault("sigkill", pid=a.pid)
    faults.sigkill(a.pid)
    a.wait_exit(5)
    wait_until(lambda: env.completed() >= n, 40, "the survivor completed all jobs")
    env.terminate(b, GRACE_S + 8)
    report = env.check()  # overlaps (two live owners) are a checker problem
    _recovery_goal(env, report)


def _recovery_goal(env: Env, report: Report, goal_s: float = RECOVERY_GOAL_S) -> None:
    env.outcome.recovery_s.extend(report.recovery_s)
    worst = max(report.recovery_s, default=0.0)
    env.outcome.goal(worst <= goal_s, f"recovery {worst:.2f} s > lease+scan+3 = {goal_s} s")


# -- S: graceful shutdown --------------------------------------------------------------------------


def s2_long_jobs(env: Env, size: int) -> None:
    """S2: SIGTERM with long jobs: exit <= grace+3 s; released jobs restart at once, uncharged."""
    running_n = 4 * size
    ids = env.enqueue(running_n + 2, 60.0)
    first = env.worker("--grace", str(GRACE_S), "--concurrency", str(running_n))
    env.ready(first)
    wait_until(lambda: len(env.records(START)) >= running_n, 20, f"{running_n} jobs running")
    exit_s = env.terminate(first, GRACE_S + 10)
    env.outcome.goal(exit_s <= GRACE_S + 3, f"exit {exit_s:.2f} s > grace+3 = {GRACE_S + 3} s")
    jobs = env.states(ids)
    env.outcome.goal(
        all(
            j is not None and j.state is JobState.QUEUED and j.attempts == 0 for j in jobs.values()
        ),
        "released jobs must be queued again with no attempt charged",
    )
    second = env.worker("--concurrency", str(running_n + 10), **{tasks.SCALE_ENV: "0.002"})
    env.ready(second)
    wait_until(lambda: env.completed() >= len(ids), 20, "all jobs completed")
    starts = {r["id"]: r for r in env.records(START, second.pid)}
    env.terminate(second, GRACE_S + 8)
    env.check()
    missing = set(ids) - set(starts)
    env.outcome.goal(not missing, f"{len(missing)} released job(s) not restarted")
    if not missing:
        # ready is printed just after the worker starts consuming: clamp the race to 0.
        delay = max(0.0, max(starts[i]["t"] for i in ids) - second.ready_at)
        env.outcome.recovery_s.append(delay)
        env.outcome.goal(delay <= 2.0, f"released jobs restarted {delay:.2f} s after ready (> 2)")
        env.outcome.goal(
            all(starts[i]["attempt"] == 1 for i in ids), "a released job was charged an attempt"
        )


def s6_idle_sigterm(env: Env, size: int) -> None:
    """S6: SIGTERM with an empty queue exits in under a second, every time."""
    for _ in range(2 * size):
        child = env.worker("--grace", str(GRACE_S))
        env.ready(child)
        time.sleep(0.3)  # idle: blocked on the broker
        exit_s = env.terminate(child, 5.0)
        env.outcome.goal(exit_s < 1.0, f"idle exit took {exit_s:.2f} s (>= 1 s)")
        child.close()
    env.check()


# -- B: broker faults ------------------------------------------------------------------------------


class _LoadThread:
    """Enqueues batches at a steady rate on its own loop, recording acked and unknown ids."""

    def __init__(self, env: Env, rate_per_s: int, seconds: float = 0.02) -> None:
        self.env = env
        self.rate = rate_per_s
        self.seconds = seconds
        self.stop = threading.Event()
        self.errors = 0
        self.acked = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        batch, period = 10, 10 / self.rate
        async with Conveyor(self.env.url) as app:
            while not self.stop.is_set():
                requests = [_request(app, self.seconds) for _ in range(batch)]
                try:
                    async with asyncio.timeout(5.0):
                        ids = [h.id for h in await app.enqueue_many(requests)]
                except Exception:
                    # The outcome is unknown (the write may have landed before the failure).
                    self.errors += 1
                    for r in requests:
                        self.env.producer.unknown(r.job.id)
                    await asyncio.sleep(0.1)
                    continue
                self.env.producer.acked_many(ids)
                self.acked += len(ids)
                await asyncio.sleep(period)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.thread.start()
        try:
            yield
        finally:
            self.stop.set()
            self.thread.join(15.0)


def b1_redis_restart(env: Env, size: int) -> None:
    """B1: SIGKILL Redis (AOF always) under load and restart it: nothing acked lost, back <= 5 s."""
    assert env.redis is not None
    worker = env.worker("--lease", "5", "--scan", "0.5", "--concurrency", "50")
    env.ready(worker)
    load = _LoadThread(env, rate_per_s=200)
    with load.running():
        for _ in range(size):
            time.sleep(1.5)
            env.driver.record_fault("redis-sigkill")
            env.redis.kill()
            time.sleep(1.0)
            env.redis.start()
            env.driver.record_heal("redis-restart")
        time.sleep(3.0)
    env.outcome.goal(load.acked > 0, "the producer got no enqueue acknowledged")
    wait_until(env.drained, 30, "the queue drained after the restarts")
    env.terminate(worker, GRACE_S + 8)
    report = env.check()
    env.outcome.recovery_s.extend(report.recovery_s)
    worst = max(report.recovery_s, default=float("inf"))
    env.outcome.goal(len(report.recovery_s) == size, "consumption never came back after a restart")
    env.outcome.goal(worst <= 5.0, f"consumption back {worst:.2f} s after Redis (> 5 s)")


def b5_half_open(env: Env, size: int) -> None:
    """B5: the worker's Redis links go half-open; detected and consuming again within 15 s."""
    assert env.redis is not None
    with FaultProxy.threaded(("127.0.0.1", env.redis.port)) as proxy:
        via = f"redis://127.0.0.1:{proxy.port}/0"
        worker = env.worker("--concurrency", "20", url=via)
        env.ready(worker)
        env.enqueue(10, 0.02)
        wait_until(lambda: env.completed() >= 10, 15, "warm-up jobs completed")
        for _ in range(size):
            # Only the links open now go silent (a dead NAT entry): reconnecting must work.
            proxy.set_mode(Mode.HALF_OPEN, apply_to="existing")
            t_fault = time.time()
            env.driver.record_fault("half-open")
            # Probes go straight to Redis, one every 0.5 s: a reserve sent on a silent link
            # reaches Redis but its reply is lost, so those probes wait for lease expiry; a
            # probe started on its first attempt proves a fresh link consumes again.
            probes: list[str] = []

            def consuming(probes: list[str] = probes) -> bool:
                firsts = {r["id"] for r in env.records(START) if r["attempt"] == 1}
                if firsts & set(probes):
                    return True
                probes.extend(env.enqueue(1, 0.02))
                return False

            wait_until(consuming, 30, "a fresh probe started after the half-open fault")
            first = min(
                r["t"] for r in env.records(START) if r["id"] in set(probes) and r["attempt"] == 1
            )
            detect = first - t_fault
            env.outcome.recovery_s.append(detect)
            env.outcome.goal(detect <= 15.0, f"half-open detection {detect:.2f} s (> 15 s)")

            def all_committed(probes: list[str] = probes) -> bool:
                return set(probes) <= {r["id"] for r in env.records(COMMITTED)}

            # Probes whose reserve reply was lost come back by lease expiry (lease 10 s).
            wait_until(all_committed, 10.0 + 2.0 + 3.0 + 5.0, "every probe committed")
        proxy.set_mode(Mode.PASS, apply_to="new")
        env.terminate(worker, GRACE_S + 8)
    env.check()


# -- L: liveness -----------------------------------------------------------------------------------


def l3_sigstop(env: Env, size: int) -> None:
    """L3: SIGSTOP a worker past its lease, SIGCONT it: its late acks are refused (dup_commit 0)."""
    n = 10 * size
    env.enqueue(n, 4.0)
    conc = ["--concurrency", str(n + 5)]
    frozen = env.worker(*FAST_OPTS, *conc)
    env.ready(frozen)
    wait_until(lambda: len(env.records(START)) >= n, 20, f"{n} jobs in flight")
    env.driver.record_fault("sigstop", pid=frozen.pid)
    faults.sigstop(frozen.pid)
    try:
        other = env.worker(*FAST_OPTS, *conc)
        env.ready(other)
        wait_until(
            lambda: len(env.records(START, other.pid)) >= n,
            RECOVERY_GOAL_S + 5,
            "the other worker took over the frozen worker's jobs",
        )
    finally:
        faults.sigcont(frozen.pid)
    # The thawed worker's runs are overdue: they end (or are revoked) and try to ack at once,
    # while the other worker's leases on the same jobs are live.
    wait_until(lambda: env.completed() >= n, 20, "all jobs completed")
    wait_until(
        lambda: len(env.records("end", frozen.pid)) >= n, 10, "the thawed worker's runs ended"
    )
    env.terminate(frozen, GRACE_S + 8)
    env.terminate(other, GRACE_S + 8)
    report = env.check()
    _recovery_goal(env, report)
    late = env.records(COMMITTED, frozen.pid)
    env.outcome.goal(not late, f"{len(late)} late ack(s) of the frozen worker were accepted")


Scenario = Callable[[Env, int], None]

#: scenario id -> (function, broker kinds it applies to); the full table is :mod:`.registry`.
SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "K1": (k1_sigkill, ("sqlite", "redis", "redis-cluster")),
    "K2": (k2_survivor, ("sqlite", "redis")),
    "S2": (s2_long_jobs, ("sqlite", "redis")),
    "S6": (s6_idle_sigterm, ("memory", "sqlite", "redis")),
    "B1": (b1_redis_restart, ("redis",)),
    "B5": (b5_half_open, ("redis",)),
    "L3": (l3_sigstop, ("sqlite", "redis")),
}

__all__ = ["SCENARIOS", "Env", "Outcome", "Scenario", "wait_until"]
