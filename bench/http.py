"""HTTP enqueue throughput: ``POST /jobs`` against one ``conveyor serve`` process.

Starts the server (uvicorn, one process) on SQLite and on a private Redis, drives ``POST /jobs``
for ``--duration`` seconds with ``wrk`` (keep-alive connections; Debian: apt-get install wrk) or,
without it, with concurrent httpx AsyncClients, and prints a table: broker, requests,
enqueues/s, p50 and p99 latency. Afterwards it checks that the queue holds exactly the jobs the
server acknowledged. Run: ``python bench/http.py [--duration 10] [--connections 16]``.
"""

# ruff: noqa: E402  (the imports follow the sys.path fix below)

from __future__ import annotations

import os
import sys

# This file is bench/http.py: run as a script, its folder comes first on sys.path and would shadow
# the standard library's http package, which httpx imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from conveyor.testing.redis_server import RedisServer, free_port, redis_server_binary


@dataclass
class Row:
    broker: str
    mode: str
    connections: int
    requests: int
    errors: int
    seconds: float
    jobs_per_request: int
    p50_ms: float
    p99_ms: float
    stored: int

    @property
    def enqueues_per_s(self) -> float:
        return self.requests * self.jobs_per_request / self.seconds


def start_server(url: str, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "conveyor.cli.serve",
        "--broker",
        url,
        "--port",
        str(port),
        "--rate-limit",
        "0",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(
                f"server exited: {process.stderr.read().decode() if process.stderr else ''}"
            )
        time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not become healthy within 20 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(2)  # SIGINT: graceful
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def body_for(jobs_per_request: int) -> str:
    job = {"task": "bench.noop", "args": [1, "two"], "kwargs": {"x": 3}}
    return json.dumps(job if jobs_per_request == 1 else [job] * jobs_per_request)


def run_wrk(
    base: str, body: str, connections: int, duration_s: float
) -> tuple[int, int, float, float, float]:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        textwrap.dedent(
            f"""
            wrk.method = "POST"
            wrk.body = {json.dumps(body)}
            wrk.headers["Content-Type"] = "application/json"
            """
        )
    )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{int(duration_s)}s",
            "--latency",
            "-s",
            str(script),
            f"{base}/jobs",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).group(1))  # type: ignore[union-attr]
    elapsed = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    assert elapsed is not None
    seconds = float(elapsed.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[elapsed.group(2)]
    errors_match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(errors_match.group(1)) if errors_match else 0
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))

    def percentile(p: str) -> float:
        match = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert match is not None, out
        return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]

    return requests, errors, seconds, percentile("50"), percentile("99")


async def run_httpx(
    base: str, body: str, connections: int, duration_s: float
) -> tuple[int, int, float, float, float]:
    latencies: list[float] = []
    errors = 0
    content = body.encode()
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        deadline = time.perf_counter() + duration_s

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.post("/jobs", content=content, headers=headers)
                latencies.append((time.perf_counter() - started) * 1000)
                errors += response.status_code != 201

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        seconds = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    return len(latencies), errors, seconds, statistics.median(latencies), p99


def bench(broker: str, url: str, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for jobs_per_request in (1, 10):
        port = free_port()
        process = start_server(url, port)
        base = f"http://127.0.0.1:{port}"
        try:
            body = body_for(jobs_per_request)
            warm_jobs = 0
            if shutil.which("wrk") and not args.httpx:
                mode = "wrk"
                run_wrk(base, body, args.connections, 1)  # warm-up: imports, scripts, caches
                warm = httpx.get(f"{base}/queues", params={"queue": "default"}, timeout=10)
                warm_jobs = warm.json()["totals"]["queued"]
                result = run_wrk(base, body, args.connections, args.duration)
            else:
                mode = "httpx"
                result = asyncio.run(run_httpx(base, body, args.connections, args.duration))
            requests, errors, seconds, p50, p99 = result
            counts = httpx.get(f"{base}/queues", params={"queue": "default"}, timeout=10).json()
            stored = counts["totals"]["queued"] - warm_jobs
        finally:
            stop_server(process)
        rows.append(
            Row(
                broker,
                mode,
                args.connections,
                requests,
                errors,
                seconds,
                jobs_per_request,
                p50,
                p99,
                stored,
            )
        )
        if url.startswith("redis"):
            import redis

            redis.Redis.from_url(url).flushdb()
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections")
    parser.add_argument("--httpx", action="store_true", help="use httpx even if wrk is installed")
    parser.add_argument(
        "--brokers", default="sqlite,redis", help="comma-separated: sqlite,redis,memory"
    )
    args = parser.parse_args()
    rows: list[Row] = []
    workdir = tempfile.mkdtemp(prefix="conveyor-bench-http-")
    for broker in args.brokers.split(","):
        if broker == "sqlite":
            rows += bench("sqlite", f"sqlite:///{os.path.join(workdir, 'bench.db')}", args)
        elif broker == "memory":
            rows += bench("memory", "memory://", args)
        elif broker == "redis":
            if redis_server_binary() is None:
                print("redis-server not installed: Redis skipped", file=sys.stderr)
                continue
            with RedisServer() as server:
                rows += bench("redis", server.url, args)
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    print(f"server: one uvicorn process, {http} HTTP parser, asyncio loop; {os.cpu_count()} cores")
    columns = [
        ("broker", 8),
        ("client", 6),
        ("conns", 5),
        ("jobs/req", 8),
        ("requests", 9),
        ("errors", 6),
        ("enqueues/s", 11),
        ("p50 ms", 7),
        ("p99 ms", 7),
        ("stored", 8),
    ]
    header = " ".join(
        f"{name:<{w}}" if i < 2 else f"{name:>{w}}" for i, (name, w) in enumerate(columns)
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [
            r.broker,
            r.mode,
            r.connections,
            r.jobs_per_request,
            r.requests,
            r.errors,
            f"{r.enqueues_per_s:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            r.stored,
        ]
        print(
            " ".join(
                f"{cell:<{w}}" if i < 2 else f"{cell!s:>{w}}"
                for i, (cell, (_, w)) in enumerate(zip(cells, columns, strict=True))
            )
        )
    # wrk stops with up to one request per connection in flight: those jobs are stored but not
    # counted as acknowledged. Anything else is a lost (or invented) job.
    for r in rows:
        acknowledged = (r.requests - r.errors) * r.jobs_per_request
        if not 0 <= r.stored - acknowledged <= r.connections * r.jobs_per_request:
            print(f"ERROR: {r.broker}: {acknowledged} enqueues acknowledged, {r.stored} stored")


if __name__ == "__main__":
    main()
