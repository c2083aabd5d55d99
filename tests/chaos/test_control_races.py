"""D4 (reliability plan 7.6): random control calls racing a real worker (hypothesis stateful).

The service runs for real (uvicorn on loopback, in a thread) and a worker *process* (the chaos
worker program) consumes the same broker, so enqueue/start/stop/delete/retry calls land on jobs
that are queued, running, retrying or finished at that moment. After every step:

* every call's answer is one the contract allows (``stop`` -> ``stopped``, ``start`` only from
  ``pending``, ``retry`` only from ``failed``/``stopped``, deleted jobs are 404 for ever);
* no job is in an impossible state: a completed job never changes again, a failed or stopped job
  only moves when we re-drive it, no two workers run a job at once (ledger overlaps), and on
  Redis an atomic snapshot shows each job in exactly one state set, the one its record holds,
  and a deleted job in none;
* stopping a running cooperative async job is observed by the job (its run ends ``cancelled``)
  within 1 s.

``make test`` runs a few examples per broker (about 10 s each); ``make chaos`` sets
``CONVEYOR_HYPOTHESIS_EXAMPLES`` (e.g. 200 examples x 50 steps = 10,000 calls).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conveyor import Conveyor
from conveyor.brokers.redis.keys import STATE_ORDER, QueueKeys
from conveyor.job import JobState
from conveyor.service import ServiceSettings, create_app
from conveyor.testing.chaos import poison_tasks as pt
from conveyor.testing.chaos import tasks
from conveyor.testing.faults import Child
from conveyor.testing.ledger import END, START, analyse, read_records
from conveyor.testing.redis_server import free_port

EXAMPLES = int(os.environ.get("CONVEYOR_HYPOTHESIS_EXAMPLES", "3"))
STEPS = int(os.environ.get("CONVEYOR_HYPOTHESIS_STEPS", "12" if EXAMPLES <= 3 else "50"))
STOP_OBSERVED_S = 1.0
#: What the runs did (calls, answers, stops observed), printed per broker.
STATS: Counter[str] = Counter()
FINISHED = {JobState.COMPLETED.value, JobState.FAILED.value, JobState.STOPPED.value}


@dataclass
class World:
    """The service URL, the broker URL and kind, and the worker's ledger directory."""

    kind: str
    broker_url: str
    api: str
    ledger: Path
    worker: Child
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.api, timeout=10.0)


@pytest.fixture(params=["sqlite", "redis"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """The service and a worker process on a fresh broker of each kind."""
    import uvicorn

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'races.db'}"
    else:
        import redis

        url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
    ledger = tmp_path / "ledger"
    worker = Child(
        [sys.executable, "-m", "conveyor.testing.chaos.worker", "--lease", "2", "--scan", "0.5"],
        env={"CONVEYOR_URL": url, tasks.LEDGER_ENV: str(ledger)},
        stderr_path=tmp_path / "worker.err",
    )
    port = free_port()
    api = create_app(Conveyor(url), settings=ServiceSettings(rate_limit_per_s=None))
    server = uvicorn.Server(
        uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    w: World | None = None
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.025)
        assert server.started, "uvicorn did not start"
        assert worker.wait_ready(30), worker.stderr()[-2000:]
        w = World(request.param, url, f"http://127.0.0.1:{port}", ledger, worker)
        yield w
    finally:
        if w is not None:
            w.client.close()
        worker.kill()
        worker.close()
        server.should_exit = True
        thread.join(10)
        loop.close()


def _redis_snapshot(url: str, ids: list[str]) -> dict[str, Any]:
    """One MULTI/EXEC read of the queue's state sets and metas: an atomic view of ``ids``."""
    import redis

    from conveyor.brokers.redis.records import decode_meta

    keys = QueueKeys("conveyor", "default")
    client = redis.Redis.from_url(url)
    try:
        with client.pipeline(transaction=True) as pipe:
            for state in STATE_ORDER:
                pipe.zrange(keys.states[state], 0, -1)
            pipe.hmget(keys.meta, ids) if ids else pipe.ping()
            pipe.hmget(keys.jobs, ids) if ids else pipe.ping()
            replies = pipe.execute()
    finally:
        client.close()
    member = {state.value: {m.decode() for m in replies[i]} for i, state in enumerate(STATE_ORDER)}
    metas = replies[len(STATE_ORDER)] if ids else [None] * len(ids)
    records = replies[len(STATE_ORDER) + 1] if ids else [None] * len(ids)
    return {
        "sets": {i: sorted(s for s, m in member.items() if i in m) for i in ids},
        "meta": {
            i: decode_meta(m).state.value if m else None for i, m in zip(ids, metas, strict=True)
        },
        "record": {i: r is not None for i, r in zip(ids, records, strict=True)},
    }


class ControlRaces(RuleBasedStateMachine):
    """Random control calls against jobs a real worker is running."""

    jobs = Bundle("jobs")
    #: Set by the test before running (hypothesis builds the machine itself).
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.http = self.world.client
        self.mine: list[str] = []
        self.deleted: set[str] = set()
        self.seen: dict[str, str] = {}  # last observed state
        self.sticky: dict[str, str] = {}  # finished state seen, not re-driven since
        self.seconds: dict[str, float] = {}  # how long each chaos.sleep job runs
        self.long_id = ""

    # -- calls -------------------------------------------------------------------------------

    @initialize(target=jobs)
    def long_job(self) -> str:
        """Every example starts with a job long enough to be stopped while it runs."""
        self.long_id = self._enqueue(3.0, held=False, failing=False)
        return self.long_id

    @rule()
    def stop_the_long_job(self) -> None:
        """Stop the first job once it runs: the stop must reach the run within 1 s."""
        if self.long_id in self.deleted or self.seen.get(self.long_id) in FINISHED:
            return
        deadline = time.monotonic() + 2.0
        while self._running_run(self.long_id) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop(self.long_id)

    @rule(
        target=jobs,
        seconds=st.sampled_from([0.05, 0.3, 1.0, 3.0]),
        held=st.booleans(),
        failing=st.booleans(),
    )
    def enqueue(self, seconds: float, held: bool, failing: bool) -> str:
        return self._enqueue(seconds, held=held, failing=failing)

    def _enqueue(self, seconds: float, *, held: bool, failing: bool) -> str:
        if failing:
            body: dict[str, Any] = {"task": pt.FAIL, "max_attempts": 1}
        else:
            body = {"task": tasks.SLEEP, "args": [seconds], "max_attempts": 2}
        body["start"] = not held
        reply = self.http.post("/jobs", json=body)
        assert reply.status_code == 201, reply.text
        job_id: str = reply.json()["job_id"]
        STATS["calls"] += 1
        STATS["enqueue"] += 1
        self.mine.append(job_id)
        if not failing:
            self.seconds[job_id] = seconds
        return job_id

    @rule(job_id=jobs)
    def start(self, job_id: str) -> None:
        reply = self.http.post(f"/jobs/{job_id}/start")
        self._answer(job_id, reply, allowed={"queued", "scheduled", "running"})
        if reply.status_code == 200:
            self.sticky.pop(job_id, None)

    @rule(job_id=jobs)
    def stop(self, job_id: str) -> None:
        self._stop(job_id)

    def _stop(self, job_id: str) -> None:
        running = self._running_run(job_id)
        t_call = time.time()
        reply = self.http.post(f"/jobs/{job_id}/stop")
        self._answer(job_id, reply, allowed={"stopped"})
        if reply.status_code != 200 or running is None:
            return
        attempt, t_start = running
        # A run that would end on its own within the goal may legitimately finish first.
        if t_start + self.seconds.get(job_id, 0.0) < t_call + STOP_OBSERVED_S + 0.5:
            return
        ended = self._wait_end(job_id, attempt, t_call + 3.0)
        assert ended is not None, f"the stopped run of {job_id} never ended"
        assert ended["outcome"] == "cancelled", ended
        lag = ended["t"] - t_call
        STATS["stops of running jobs observed"] += 1
        STATS["max stop lag ms"] = max(STATS["max stop lag ms"], round(lag * 1000))
        assert lag <= STOP_OBSERVED_S, f"stop observed {lag:.2f} s after the call"

    @rule(job_id=jobs)
    def delete(self, job_id: str) -> None:
        reply = self.http.delete(f"/jobs/{job_id}")
        STATS["calls"] += 1
        STATS[f"delete {reply.status_code}"] += 1
        if job_id in self.deleted:
            assert reply.status_code == 404, reply.text
            return
        assert reply.status_code == 200, reply.text
        self.deleted.add(job_id)

    @rule(job_id=jobs)
    def retry(self, job_id: str) -> None:
        reply = self.http.post(f"/jobs/{job_id}/retry")
        # The answer is read after the redrive: the worker may have taken it already.
        self._answer(
            job_id, reply, allowed={"queued", "scheduled", "running", "completed", "failed"}
        )
        if reply.status_code == 200:
            self.sticky.pop(job_id, None)

    @rule(pause=st.sampled_from([0.05, 0.2, 0.5]))
    def wait(self, pause: float) -> None:
        time.sleep(pause)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def states_are_possible(self) -> None:
        for job_id in self.mine:
            reply = self.http.get(f"/jobs/{job_id}")
            if job_id in self.deleted:
                assert reply.status_code == 404, f"deleted job {job_id} is back: {reply.text}"
                continue
            assert reply.status_code == 200, reply.text
            state = reply.json()["state"]
            assert state in {s.value for s in JobState}
            before = self.sticky.get(job_id)
            assert before is None or state == before, (
                f"job {job_id} left {before} for {state} without a re-drive"
            )
            if state in FINISHED:
                self.sticky[job_id] = state
            self.seen[job_id] = state

    @invariant()
    def no_two_owners(self) -> None:
        overlaps = analyse(read_records(self.world.ledger)).overlaps
        assert not overlaps, overlaps

    @invariant()
    def redis_sets_agree(self) -> None:
        if self.world.kind != "redis" or not self.mine:
            return
        snap = _redis_snapshot(self.world.broker_url, self.mine)
        for job_id in self.mine:
            sets, meta = snap["sets"][job_id], snap["meta"][job_id]
            if job_id in self.deleted:
                assert not sets, snap
                assert meta is None, snap
                assert not snap["record"][job_id], snap
                continue
            assert sets == [meta], f"job {job_id}: in state sets {sets}, record says {meta}"

    # -- helpers -----------------------------------------------------------------------------

    def _answer(self, job_id: str, reply: httpx.Response, allowed: set[str]) -> None:
        action = reply.request.url.path.rsplit("/", 1)[-1]
        STATS["calls"] += 1
        STATS[f"{action} {reply.status_code}"] += 1
        if job_id in self.deleted:
            assert reply.status_code == 404, reply.text
            return
        assert reply.status_code in (200, 409), reply.text
        if reply.status_code == 200:
            state = reply.json()["state"]
            assert state in allowed, f"{reply.request.url.path} -> {state}"

    def _running_run(self, job_id: str) -> tuple[int, float] | None:
        """The (attempt, start time) of a run of ``job_id`` not ended yet, per the ledger."""
        open_runs: dict[int, float] = {}
        for r in read_records(self.world.ledger):
            if r.get("id") != job_id:
                continue
            if r["k"] == START:
                open_runs[r["attempt"]] = r["t"]
            elif r["k"] == END:
                open_runs.pop(r["attempt"], None)
        if not open_runs:
            return None
        attempt = max(open_runs)
        return attempt, open_runs[attempt]

    def _wait_end(self, job_id: str, attempt: int, deadline: float) -> dict[str, Any] | None:
        while time.time() < deadline:
            for r in read_records(self.world.ledger):
                if r["k"] == END and r.get("id") == job_id and r["attempt"] == attempt:
                    return r
            time.sleep(0.02)
        return None


@pytest.mark.slow
@pytest.mark.timeout(60 + EXAMPLES * STEPS * 2)
def test_d4_control_calls_racing_a_worker_leave_no_impossible_state(world: World) -> None:
    ControlRaces.world = world
    STATS.clear()
    run_state_machine_as_test(
        ControlRaces,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    print(f"\n[D4 {world.kind}] {dict(STATS)}")
    assert world.worker.alive, "the worker died"
    assert STATS["calls"] > 0
