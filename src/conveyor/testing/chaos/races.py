"""Duplicates and ordering (reliability plan 7.6: D1-D3), as chaos scenarios.

* D1: the same dedup keys enqueued concurrently from two producer processes (each with five
  concurrent calls per key, as a client retrying after timeouts would): one job per key.
* D2: no faults, many jobs, several workers: no job starts twice (dup_exec 0).
* D3: one worker with concurrency 1: jobs start in enqueue order within each priority.

D4 (random control calls against running jobs) is the hypothesis state machine in
``tests/chaos/test_control_races.py``. ``size`` 1 is the fast tier; ``size`` >= 10 runs the
plan's full counts.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

from conveyor.client import Conveyor
from conveyor.job import Priority, new_job_id
from conveyor.testing.chaos import tasks
from conveyor.testing.chaos.poison import scaled
from conveyor.testing.chaos.scenarios import FAST_OPTS, GRACE_S, Env, Scenario, wait_until
from conveyor.testing.ledger import START

#: A producer process: enqueue every key ``per_key`` times at once; print {key: [ids]} as JSON.
_PRODUCER = """
import asyncio, json, sys
from conveyor import Conveyor
from conveyor.testing.chaos import tasks

async def main(url, keys, per_key):
    async with Conveyor(url) as app:
        async def one(key):
            handle = await app.enqueue(
                tasks.SLEEP, args=[0.0], dedup_key=key, on_success=tasks.COMMITTED
            )
            return key, handle.id
        calls = [one(k) for k in keys for _ in range(per_key)]
        found = {}
        for key, job_id in await asyncio.gather(*calls):
            found.setdefault(key, []).append(job_id)
        print(json.dumps(found))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])))
"""


def d1_dedup(env: Env, size: int) -> None:
    """D1: each dedup key enqueued 10x concurrently by 2 processes: exactly one job per key."""
    keys = [f"key-{i}" for i in range(scaled(size, 10, 1000))]
    producers, per_key = 2, 5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PRODUCER, env.url, json.dumps(keys), str(per_key)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(producers)
    ]
    ids_by_key: dict[str, set[str]] = {k: set() for k in keys}
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"producer failed:\n{err[-2000:]}")
        for key, ids in json.loads(out).items():
            ids_by_key[key].update(ids)
    split = {k: v for k, v in ids_by_key.items() if len(v) != 1}
    env.outcome.goal(not split, f"{len(split)} key(s) got more than one job id: {split}")
    job_ids = sorted({i for ids in ids_by_key.values() for i in ids})
    env.producer.acked_many(job_ids)

    async def stored(app: Conveyor) -> dict[str, int]:
        counts: dict[str, int] = {}
        cursor: str | None = None
        while True:
            page = await app.list_jobs(queue="default", limit=1000, cursor=cursor)
            for job in page.jobs:
                if job.dedup_key is not None:
                    counts[job.dedup_key] = counts.get(job.dedup_key, 0) + 1
            cursor = page.next_cursor
            if cursor is None:
                return counts

    counts = env.run(stored)
    extra = {k: n for k, n in counts.items() if n != 1}
    env.outcome.goal(not extra and len(counts) == len(keys), f"jobs per key in the broker: {extra}")
    worker = env.worker(*FAST_OPTS)
    env.ready(worker)
    wait_until(lambda: env.completed() >= len(job_ids), 60, "the deduplicated jobs completed")
    env.terminate(worker, GRACE_S + 8)
    report = env.check()
    env.outcome.goal(not report.dup_exec, f"{len(report.dup_exec)} job(s) ran twice")


def d2_no_duplicates(env: Env, size: int) -> None:
    """D2: no faults, many jobs, several workers at once: dup_exec 0, lost 0."""
    n = scaled(size, 3000, 100_000)
    workers_n = 3 if size <= 1 else 8
    ids: list[str] = []
    for start in range(0, n, 5000):  # batches keep each enqueue call bounded
        ids += env.enqueue(min(5000, n - start), 0.0)
    workers = [env.worker(*FAST_OPTS, "--concurrency", "50") for _ in range(workers_n)]
    for w in workers:
        env.ready(w, timeout_s=40)
    wait_until(lambda: env.completed() >= n, 60 + n / 200, f"{n} jobs completed")
    busy = sum(1 for w in workers if env.records(START, w.pid))
    for w in workers:
        env.terminate(w, GRACE_S + 8)
    report = env.check()
    env.outcome.goal(busy >= 2, f"only {busy} of {workers_n} workers got jobs")
    env.outcome.goal(not report.dup_exec, f"{len(report.dup_exec)} job(s) started twice")


def d3_fifo(env: Env, size: int) -> None:
    """D3: concurrency 1, no faults: start order is enqueue order within each priority."""
    n = scaled(size, 1000, 10_000)
    rng = random.Random(n)
    priorities = [rng.choice(list(Priority)) for _ in range(n)]

    async def go(app: Conveyor) -> list[str]:
        requests = [
            app.request(
                tasks.SLEEP, args=[0.0], job_id=new_job_id(), on_success=tasks.COMMITTED, priority=p
            )
            for p in priorities
        ]
        return [h.id for h in await app.enqueue_many(requests)]

    ids: list[str] = env.run(go)
    env.producer.acked_many(ids)
    worker = env.worker(*FAST_OPTS, "--concurrency", "1")
    env.ready(worker)
    wait_until(lambda: env.completed() >= n, 30 + n / 100, f"{n} jobs completed")
    env.terminate(worker, GRACE_S + 8)
    env.check()
    # All were queued before the worker started: the whole run is high, then normal, then low,
    # each in enqueue order.
    index = {job_id: (priorities[i].rank, i) for i, job_id in enumerate(ids)}
    started = [index[r["id"]] for r in env.records(START) if r["id"] in index]
    violations = sum(1 for a, b in itertools.pairwise(started) if b < a)
    env.outcome.recovery_s.append(float(violations))
    env.outcome.goal(len(started) == n, f"{len(started)} starts recorded for {n} jobs")
    env.outcome.goal(violations == 0, f"{violations} order violation(s) in {n} starts")


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "D1": (d1_dedup, ("sqlite", "redis")),
    "D2": (d2_no_duplicates, ("sqlite", "redis")),
    "D3": (d3_fifo, ("sqlite", "redis")),
}

__all__ = ["SCENARIOS"]
