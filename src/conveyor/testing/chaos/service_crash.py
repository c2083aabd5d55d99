"""K6 (reliability plan 7.1): SIGKILL the HTTP service under an enqueue load, then restart it.

Clients POST ``/jobs`` with a ``dedup_key`` per job and let the service pick the id. A 2xx is an
acknowledged enqueue (recorded in the ledger); any other end (reset, refused, timeout, 5xx) is an
unknown outcome, retried with the same key once the service is back. No worker runs during the
load, so every stored job is still live when its retry arrives and the key must collapse the
retry into it. Then a worker drains and the checker proves: nothing acknowledged lost, and no
job the clients never heard of (a duplicate would run under an id nobody acknowledged); the
broker holds exactly one job per key.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections import Counter
from typing import Any

from conveyor.client import Conveyor
from conveyor.testing import faults
from conveyor.testing.chaos import tasks
from conveyor.testing.chaos.scenarios import FAST_OPTS, GRACE_S, Env, Scenario, wait_until
from conveyor.testing.faults import Child
from conveyor.testing.redis_server import free_port

QUEUE = "k6"
CLIENTS = 3
#: Pause between a client's requests: ~100 enqueues/s in all, enough to be mid-request at the
#: kill without a backlog that takes the worker long to drain.
PAUSE_S = 0.03


class _Service:
    """``conveyor serve`` on a fixed port, restartable (a new Child each time)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.port = free_port()
        self.child: Child | None = None
        self.starts = 0

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "conveyor.cli.serve", "--broker", self.env.url,
            "--app", "conveyor.testing.chaos.tasks:app", "--port", str(self.port),
            "--rate-limit", "0", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        self.child = Child(
            argv,
            env={"CONVEYOR_URL": self.env.url, tasks.LEDGER_ENV: str(self.env.ledger_dir)},
            stderr_path=self.env.dir / f"serve-{self.starts}.err",
        )
        self.starts += 1
        self.env.children.append(self.child)
        wait_until(self.healthy, 40, "the service answering /health")

    def healthy(self) -> bool:
        try:
            status, _ = request("GET", self.port, "/health", None, timeout_s=1.0)
        except OSError:
            return False
        return status == 200

    def kill(self) -> None:
        assert self.child is not None
        faults.sigkill(self.child.pid)
        self.child.wait_exit(5.0)


def request(
    method: str, port: int, path: str, body: Any, *, timeout_s: float = 5.0
) -> tuple[int, Any]:
    """One HTTP request on a fresh connection: (status, decoded JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, None
    finally:
        conn.close()


class _Load:
    """``CLIENTS`` threads enqueueing one job per request, each with its own dedup key."""

    def __init__(self, env: Env, service: _Service) -> None:
        self.env = env
        self.service = service
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next_key = 0
        self.ids: dict[str, str] = {}  # key -> acknowledged job id
        self.unknown: list[str] = []  # keys whose request ended without an answer
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                key = f"k6-{self.next_key}"
                self.next_key += 1
            if not self.send(key):
                with self.lock:
                    self.unknown.append(key)
            time.sleep(PAUSE_S)

    def send(self, key: str) -> bool:
        """POST the job of ``key``; True once acknowledged (its id recorded)."""
        body = {"task": tasks.SLEEP, "args": [0.01], "queue": QUEUE, "dedup_key": key}
        try:
            status, answer = request("POST", self.service.port, "/jobs", body)
        except (OSError, http.client.HTTPException):
            return False
        if status // 100 != 2 or not isinstance(answer, dict) or "job_id" not in answer:
            return False
        job_id = str(answer["job_id"])
        self.env.producer.acked(job_id)
        with self.lock:
            previous = self.ids.setdefault(key, job_id)
        self.env.outcome.goal(previous == job_id, f"key {key} answered two ids")
        return True


def k6_service_killed(env: Env, size: int) -> None:
    """K6: SIGKILL ``conveyor serve`` mid-request, restart it: no acked loss, no duplicate."""
    service = _Service(env)
    service.start()
    load = _Load(env, service)
    for t in load.threads:
        t.start()
    try:
        for _ in range(size):
            time.sleep(1.0)
            env.driver.record_fault("serve-sigkill")
            service.kill()
            time.sleep(0.3)
            service.start()
            env.driver.record_heal("serve-restart")
        time.sleep(0.5)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(10.0)
    env.outcome.goal(len(load.ids) > 0, "no enqueue was acknowledged")
    env.outcome.goal(len(load.unknown) > 0, "the kill interrupted no request")
    # Retry every unknown outcome with its key, until the service answers.
    for key in load.unknown:
        deadline = time.monotonic() + 20.0
        while not load.send(key):
            if time.monotonic() > deadline:
                env.outcome.goal(False, f"the retry of {key} was never answered")
                break
            time.sleep(0.1)
    keys = [f"k6-{i}" for i in range(load.next_key)]
    per_key = _jobs_per_key(env)
    extra = [k for k, n in per_key.items() if n > 1]
    env.outcome.goal(not extra, f"{len(extra)} dedup key(s) hold several jobs, e.g. {extra[:3]}")
    missing = [k for k in keys if k not in load.ids]
    env.outcome.goal(not missing, f"{len(missing)} key(s) never acknowledged")
    worker = env.worker(*FAST_OPTS, "--queues", QUEUE)
    env.ready(worker)
    wait_until(lambda: _unfinished(env) == 0, 30, "the worker drained the enqueued jobs")
    env.terminate(worker, GRACE_S + 8)
    env.check()  # unexpected > 0 would be a duplicate nobody acknowledged


def _jobs_per_key(env: Env) -> Counter[str]:
    async def go(app: Conveyor) -> Counter[str]:
        counter: Counter[str] = Counter()
        cursor: str | None = None
        while True:
            page = await app.list_jobs(queue=QUEUE, limit=1000, cursor=cursor)
            counter.update(j.dedup_key or "" for j in page.jobs)
            cursor = page.next_cursor
            if cursor is None:
                return counter

    result: Counter[str] = env.run(go)
    return result


def _unfinished(env: Env) -> int:
    async def go(app: Conveyor) -> int:
        counts = (await app.counts(QUEUE)).get(QUEUE, {})
        return sum(n for state, n in counts.items() if not state.is_finished)

    try:
        return int(env.run(go))
    except Exception:
        return -1


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "K6": (k6_service_killed, ("sqlite", "redis")),
}

__all__ = ["SCENARIOS", "request"]
