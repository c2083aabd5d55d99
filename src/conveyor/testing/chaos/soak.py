"""The soak (reliability plan T6): steady load, 1 % failing jobs, a worker SIGKILL at intervals.

Two workers share the queue: the *steady* one runs for the whole soak and is measured (resident
memory and open descriptors, sampled every few seconds), the *victim* is SIGKILLed and started
again ``KILLS`` times. A producer thread offers a steady rate of short ``chaos.sleep`` jobs and,
one in a hundred, a ``chaos.flaky`` job (:mod:`.tasks`) that fails its first attempt and
succeeds on the retry.

Goals: the ledger checker's (lost = unexpected = dup_commit = overlaps = 0, every orphan
restarted), recovery after each kill within lease + scan + 3 s, the steady worker's RSS growth
after the warm-up within 10 %, and its descriptor count within 5 of the warm-up value.

The duration is :data:`SOAK_SECONDS` (``python -m conveyor.testing.chaos --soak-minutes M`` sets
it); the default is a one-minute smoke run.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import zlib
from pathlib import Path

from conveyor.client import Conveyor
from conveyor.job import new_job_id
from conveyor.testing import faults
from conveyor.testing.chaos import tasks
from conveyor.testing.chaos.scenarios import (
    FAST_OPTS,
    GRACE_S,
    RECOVERY_GOAL_S,
    Env,
    Scenario,
    wait_until,
)
from conveyor.testing.ledger import START

#: How long a soak runs (seconds); ``--soak-minutes`` sets it.
SOAK_SECONDS = 60.0
#: Worker SIGKILLs spread over the soak.
KILLS = 10
#: Jobs offered per second (a steady half-load on this 2-core machine, with the other broker's
#: soak running beside it).
RATE_PER_S = 150
FLAKY = tasks.FLAKY


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class _Producer(threading.Thread):
    """Offers ``RATE_PER_S`` jobs a second in batches of 10, recording acked and unknown ids."""

    def __init__(self, env: Env) -> None:
        super().__init__(daemon=True)
        self.env = env
        self.halt = threading.Event()
        self.acked = 0
        self.errors = 0

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        period = 10 / RATE_PER_S
        async with Conveyor(self.env.url) as app:
            next_at = time.monotonic()
            while not self.halt.is_set():
                requests = []
                for _ in range(10):
                    job_id = new_job_id()
                    # One job in a hundred fails once (chosen by id, so reruns are alike).
                    name = FLAKY if zlib.crc32(job_id.encode()) % 100 == 0 else tasks.SLEEP
                    requests.append(
                        app.request(name, args=[0.05], job_id=job_id, on_success=tasks.COMMITTED)
                    )
                try:
                    async with asyncio.timeout(5.0):
                        handles = await app.enqueue_many(requests)
                except Exception:
                    self.errors += 1
                    for r in requests:
                        self.env.producer.unknown(r.job.id)
                else:
                    self.env.producer.acked_many(h.id for h in handles)
                    self.acked += len(handles)
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def soak(env: Env, size: int) -> None:
    """T6: steady load with 1 % failures and periodic worker SIGKILLs; memory and fds stay flat."""
    duration = SOAK_SECONDS * size
    opts = [*FAST_OPTS, "--concurrency", "200"]
    steady = env.worker(*opts)
    victim = env.worker(*opts)
    env.ready(steady)
    env.ready(victim)
    producer = _Producer(env)
    producer.start()
    samples: list[tuple[float, int, int]] = []
    t0 = time.monotonic()
    kill_every = duration / (KILLS + 1)
    next_kill = t0 + kill_every
    kills = 0
    try:
        while (now := time.monotonic()) < t0 + duration:
            samples.append((now - t0, _rss_kib(steady.pid), _fds(steady.pid)))
            env.outcome.goal(steady.alive, "the steady worker died")
            if not steady.alive:
                return
            if now >= next_kill and kills < KILLS:
                # Only a victim that holds work makes the kill a real test of recovery.
                if any(r["pid"] == victim.pid for r in env.records(START)):
                    env.driver.record_fault("sigkill", pid=victim.pid)
                    faults.sigkill(victim.pid)
                    victim.wait_exit(5)
                    victim.close()
                    victim = env.worker(*opts)
                    env.ready(victim)
                    kills += 1
                next_kill += kill_every
            time.sleep(min(2.0, max(0.1, duration / 200)))
    finally:
        producer.halt.set()
        producer.join(15.0)
    env.outcome.goal(producer.acked > 0, "the producer got no enqueue acknowledged")
    wait_until(env.drained, 60, "the queue drained after the soak")
    env.terminate(victim, GRACE_S + 8)
    env.terminate(steady, GRACE_S + 8)
    report = env.check()
    env.outcome.recovery_s.extend(report.recovery_s)
    worst = max(report.recovery_s, default=0.0)
    env.outcome.goal(kills >= 1, "no worker was killed during the soak")
    env.outcome.goal(
        worst <= RECOVERY_GOAL_S, f"recovery {worst:.2f} s > lease+scan+3 = {RECOVERY_GOAL_S} s"
    )
    _memory_goals(env, samples, duration)
    env.outcome.notes.update(kills=str(kills), acked=str(producer.acked))


def _memory_goals(env: Env, samples: list[tuple[float, int, int]], duration: float) -> None:
    # Warm-up: the first 10 % of the soak (at least 10 s): imports, pools and caches fill up.
    warm = [s for s in samples if s[0] >= max(10.0, duration * 0.1)]
    if len(warm) < 2:
        env.outcome.goal(False, "too few samples after the warm-up to judge memory")
        return
    base_rss, base_fds = warm[0][1], warm[0][2]
    peak_rss = max(s[1] for s in warm)
    last_rss = warm[-1][1]
    fd_drift = max(abs(s[2] - base_fds) for s in warm)
    growth = (last_rss - base_rss) / base_rss * 100
    env.outcome.notes.update(
        rss_mib=f"{base_rss / 1024:.0f}->{last_rss / 1024:.0f} (peak {peak_rss / 1024:.0f})",
        rss_growth=f"{growth:+.1f}%",
        fds=f"{base_fds}±{fd_drift}",
    )
    env.outcome.goal(growth <= 10.0, f"steady worker RSS grew {growth:.1f} % after warm-up (> 10)")
    env.outcome.goal(fd_drift <= 5, f"steady worker fds drifted by {fd_drift} (> 5)")


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "T6": (soak, ("sqlite", "redis")),
}

__all__ = ["FLAKY", "KILLS", "RATE_PER_S", "SCENARIOS", "SOAK_SECONDS", "soak"]
