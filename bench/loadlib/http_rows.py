"""T3, T7 and T8 of reliability plan 7.7: a real ``conveyor serve`` process under load.

The server runs as a user would run it: its own process, a bearer token from ``$CONVEYOR_TOKEN``,
and a per-client rate limit set far above what this machine can offer (so it never interferes:
every request here comes from one address). Load comes from ``wrk`` (see :mod:`.wrk`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgspec
from bench import worker as worker_bench
from bench.loadlib.common import Row, pct, rss_mb
from bench.loadlib.wrk import WrkResult, run_wrk

from conveyor import Conveyor
from conveyor.testing.redis_server import free_port
from conveyor.worker import Worker

T3_GOALS = {"memory": (1_000.0, 50.0), "sqlite": (500.0, 100.0), "redis": (500.0, 100.0)}
T3_CONNECTIONS = 64
JOB_BODY = json.dumps({"task": "bench.noop", "args": [1, "two"], "kwargs": {"x": 3}})
MIB = 2**20


@dataclass
class Server:
    """A running ``conveyor serve`` process."""

    process: subprocess.Popen[bytes]
    base: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """What a client sends: the token and the JSON content type."""
        return {"authorization": f"Bearer {self.token}", "content-type": "application/json"}


@contextlib.contextmanager
def serve(url: str, *options: str) -> Iterator[Server]:
    """``conveyor serve`` on ``url`` (plus ``options``) and a free loopback port, healthy."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    command = [
        sys.executable, "-m", "conveyor.cli.serve", "--broker", url, "--port", str(port),
        "--rate-limit", "1000000", "--rate-burst", "1000000",
        "--no-access-log", "--log-level", "warning", *options,
    ]  # fmt: skip
    env = {**os.environ, "CONVEYOR_TOKEN": token}
    process = subprocess.Popen(command, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"conveyor serve did not become healthy ({process.poll()})")
            time.sleep(0.1)
        yield Server(process, base, token)
    finally:
        process.send_signal(2)  # SIGINT: the graceful stop a user's Ctrl-C gives
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _statuses(result: WrkResult) -> str:
    return ", ".join(f"{s}: {n:,}" for s, n in sorted(result.statuses.items()))


def t3_http(kind: str, seconds: float) -> tuple[Row, float]:
    """T3: POST /jobs under wrk, keep-alive, 64 connections; the row and the req/s reached."""
    min_rate, max_p99 = T3_GOALS[kind]
    with worker_bench.broker_url(kind, None) as url, serve(url) as server:
        target = f"{server.base}/jobs"
        run_wrk(target, JOB_BODY, server.token, connections=T3_CONNECTIONS, seconds=1)  # warm-up
        r = run_wrk(target, JOB_BODY, server.token, connections=T3_CONNECTIONS, seconds=seconds)
    fives = sum(n for s, n in r.statuses.items() if s >= 500)
    row = Row(
        "T3",
        f"HTTP POST /jobs, wrk, {T3_CONNECTIONS} conns, {seconds:g} s",
        kind,
        f"{r.rate:,.0f} req/s; p50 {r.p50_ms:.1f} / p99 {r.p99_ms:.1f} ms; 5xx {fives}; "
        f"non-201 {r.requests - r.count(201)}",
        f">= {min_rate:,.0f} req/s; p99 <= {max_p99:g} ms; 0 5xx",
        r.rate >= min_rate and r.p99_ms <= max_p99 and fives == 0 and r.timeouts == 0,
    )
    return row, r.rate


# -- T7: overload -------------------------------------------------------------------------------


def _latency_ms(client: httpx.Client, server: Server) -> float:
    started = time.perf_counter()
    client.post(f"{server.base}/jobs", content=JOB_BODY, headers=server.headers)
    return (time.perf_counter() - started) * 1000


def _sample_refusals(server: Server, stop: threading.Event, out: dict[str, int]) -> None:
    """A Python client during the overload: statuses, and 429/503 lacking Retry-After."""
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.post(
                    f"{server.base}/jobs", content=JOB_BODY, headers=server.headers
                )
            except httpx.TimeoutException:
                out["timeout"] = out.get("timeout", 0) + 1
                continue
            key = str(response.status_code)
            out[key] = out.get(key, 0) + 1
            if response.status_code in (429, 503) and "retry-after" not in response.headers:
                out["no_retry_after"] = out.get("no_retry_after", 0) + 1
            stop.wait(0.05)


def t7_overload(kind: str, t3_rate: float, seconds: float) -> list[Row]:
    """T7: offer 3x the T3 rate for ``seconds``; refusals not timeouts, RSS, recovery time."""
    offered = 3 * t3_rate
    # Each connection waits delay_ms between its requests: connections / delay = offered rate.
    # wrk is closed-loop: a connection waiting on a slow answer offers nothing meanwhile, so
    # there are enough of them to keep offering the rate with a second's worth of requests in
    # flight (uvicorn's default backlog, 2048, queues the connects).
    connections = max(256, min(1024, int(offered)))
    delay_ms = max(1, int(connections / offered * 1000))
    with worker_bench.broker_url(kind, None) as url, serve(url) as server:
        with httpx.Client(timeout=10) as client:
            for _ in range(20):  # warm-up
                _latency_ms(client, server)
            baseline = [_latency_ms(client, server) for _ in range(50)]
        normal_ms = max(2 * statistics.median(baseline), pct(baseline, 0.99))
        rss_before = rss_mb(server.process.pid) or 0.0
        peak = [rss_before]
        stop = threading.Event()
        sampled: dict[str, int] = {}

        def watch_rss() -> None:
            while not stop.wait(0.2):
                peak.append(rss_mb(server.process.pid) or 0.0)

        helpers = [
            threading.Thread(target=watch_rss, daemon=True),
            threading.Thread(target=_sample_refusals, args=(server, stop, sampled), daemon=True),
        ]
        for helper in helpers:
            helper.start()
        try:
            r = run_wrk(
                f"{server.base}/jobs", JOB_BODY, server.token,
                connections=connections, seconds=seconds, delay_ms=delay_ms,
            )  # fmt: skip
        finally:
            stop.set()
            for helper in helpers:
                helper.join()
        recovery_s, alive = _recovery(server, normal_ms)
    refusals = r.count(429, 503)
    others = r.requests - r.count(201) - refusals
    rows = [
        Row(
            "T7",
            f"overload: {offered:,.0f} req/s offered (3x T3), {seconds:g} s, {connections} conns",
            kind,
            f"{r.rate:,.0f} resp/s; {_statuses(r)}; timeouts {r.timeouts}; "
            f"socket errors {r.socket_errors}; 429/503 w/o Retry-After {r.no_retry_after}; "
            f"p99 {r.p99_ms:.0f} ms",
            "429/503 + Retry-After, no timeouts",
            r.timeouts == 0 and r.no_retry_after == 0 and others == 0 and r.server_errors == 0,
        ),
        Row(
            "T7",
            "overload: a Python client's sample",
            kind,
            ", ".join(f"{k}: {v}" for k, v in sorted(sampled.items())) or "no answers",
            "every 429/503 has Retry-After; no timeouts",
            not sampled.get("no_retry_after") and not sampled.get("timeout") and bool(sampled),
        ),
        Row(
            "T7",
            "overload: server RSS; recovery after the load stops",
            kind,
            f"RSS {rss_before:.0f} -> peak {max(peak):.0f} MB; back to <= {normal_ms:.1f} ms "
            f"in {recovery_s:.1f} s",
            "alive, RSS bounded (<= 300 MB); recovery <= 30 s",
            alive and max(peak) <= 300 and recovery_s <= 30,
        ),
    ]
    return rows


def _recovery(server: Server, normal_ms: float, limit_s: float = 60.0) -> tuple[float, bool]:
    """Seconds from the end of the load until 5 probes in a row answer 201 within ``normal_ms``."""
    started = time.monotonic()
    in_a_row = 0
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - started < limit_s:
            t0 = time.perf_counter()
            try:
                response = client.post(
                    f"{server.base}/jobs", content=JOB_BODY, headers=server.headers
                )
                ok = response.status_code == 201
            except httpx.HTTPError:
                ok = False
            ok = ok and (time.perf_counter() - t0) * 1000 <= normal_ms
            in_a_row = in_a_row + 1 if ok else 0
            if in_a_row == 5:
                return time.monotonic() - started, server.process.poll() is None
            time.sleep(0.05)
    return time.monotonic() - started, server.process.poll() is None


# -- T8: payload sizes --------------------------------------------------------------------------

_PAYLOAD_OVERHEAD = len(msgspec.json.encode([[""], {}]))  # the encoded [args, kwargs] around it


def _args_for(size: int) -> list[str]:
    """Args whose encoded payload ([args, kwargs]) is exactly ``size`` bytes."""
    return ["x" * (size - _PAYLOAD_OVERHEAD)]


async def _payload_rate(url: str, size: int, jobs: int) -> float:
    """Jobs/s through a running worker: enqueue ``jobs`` jobs of ``size`` bytes one by one, run.

    The worker is started (and idle) before the clock starts, and the clock stops when the last
    job has run: start-up and shutdown are not part of the rate.
    """
    app = Conveyor(url)
    ran = 0
    all_ran = asyncio.Event()

    @app.task(name="blob", queue="t8")
    async def blob(data: str) -> None:
        nonlocal ran
        ran += 1
        if ran == jobs:
            all_ran.set()

    args = _args_for(size)
    async with app, Worker(app, queues=["t8"], concurrency={"async": 50}):
        await asyncio.sleep(0.5)  # let the fetcher reach its wait
        started = time.perf_counter()
        for _ in range(jobs):
            await app.enqueue("blob", args=args, queue="t8")
        async with asyncio.timeout(120):
            await all_ran.wait()
        return jobs / (time.perf_counter() - started)


async def t8_payloads(kind: str, sizes: list[tuple[str, int, int]]) -> list[Row]:
    """T8: jobs/s per payload size (enqueue + run), library side."""
    rows = []
    for label, size, jobs in sizes:
        with worker_bench.broker_url(kind, None) as url:
            rate = await _payload_rate(url, size, jobs)
        judged = size == 256 * 1024
        rows.append(
            Row(
                "T8",
                f"payload {label}: enqueue 1 by 1 + run, {jobs} jobs",
                kind,
                f"{rate:,.0f} jobs/s",
                ">= 200 jobs/s" if judged else "-",
                rate >= 200 if judged else None,
            )
        )
    return rows


def t8_http_cap(kind: str) -> Row:
    """T8 over HTTP: a 1 MiB payload is accepted (201), 1 MiB + 1 byte is refused with 413."""
    codes = []
    with (
        worker_bench.broker_url(kind, None) as url,
        serve(url) as server,
        httpx.Client(timeout=30) as client,
    ):
        for size in (MIB, MIB + 1):
            body = json.dumps({"task": "bench.noop", "args": _args_for(size)})
            response = client.post(f"{server.base}/jobs", content=body, headers=server.headers)
            codes.append(response.status_code)
    return Row(
        "T8",
        "HTTP POST /jobs: payload 1 MiB; 1 MiB + 1 byte",
        kind,
        f"{codes[0]}; {codes[1]}",
        "201; 413",
        codes == [201, 413],
    )
