"""Driving ``wrk`` with a Lua script that POSTs an enqueue body and counts statuses.

The script counts every response status per thread, and how many 429/503 answers came without
``Retry-After``; ``done`` merges the threads' counts and prints them with the latency figures in
a line format parsed here. An optional per-connection ``delay`` paces the offered rate, so a
server that answers fast refusals keeps receiving the offered load (an open-loop approximation).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. {token}
local threads = {{}}
local delay_ms = {delay_ms}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {{}}
  no_retry_after = 0
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function response_counting(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if (status == 429 or status == 503)
      and headers["retry-after"] == nil and headers["Retry-After"] == nil then
    no_retry_after = no_retry_after + 1
  end
end

if {count} then
  response = response_counting
end

function done(summary, latency, requests)
  local merged = {{}}
  local missing = 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      merged[status] = (merged[status] or 0) + n
    end
    missing = missing + thread:get("no_retry_after")
  end
  for status, n in pairs(merged) do
    io.write(string.format("STATUS %d %d\\n", status, n))
  end
  io.write(string.format("NO_RETRY_AFTER %d\\n", missing))
  io.write(string.format("TIMEOUTS %d\\n", summary.errors.timeout))
  io.write(string.format("NON_2XX %d\\n", summary.errors.status))
  io.write(string.format("SOCKET_ERRORS %d\\n",
    summary.errors.connect + summary.errors.read + summary.errors.write))
  io.write(string.format("REQUESTS %d %d\\n", summary.requests, summary.duration))
  io.write(string.format("LATENCY_US %d %d %d\\n",
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class WrkResult:
    """What one wrk run saw."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    timeouts: int
    socket_errors: int
    no_retry_after: int
    non_2xx: int
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Responses per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    def count(self, *statuses: int) -> int:
        """Responses with any of ``statuses``."""
        return sum(self.statuses.get(s, 0) for s in statuses)

    @property
    def server_errors(self) -> int:
        """5xx responses other than the 503 refusals."""
        return sum(n for s, n in self.statuses.items() if s >= 500 and s != 503)


def have_wrk() -> bool:
    """Whether the ``wrk`` binary is on PATH."""
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: str,
    token: str,
    *,
    connections: int,
    seconds: float,
    delay_ms: int = 0,
    timeout_s: float = 2.0,
    count_statuses: bool = True,
) -> WrkResult:
    """Run wrk (one thread: the other core serves) against ``url``; parse its report."""
    script = _SCRIPT.format(
        body=json.dumps(body),
        token=json.dumps(token),
        delay_ms=int(delay_ms),
        count="true" if count_statuses else "false",
    )
    with tempfile.TemporaryDirectory(prefix="conveyor-load-") as tmp:
        path = Path(tmp) / "enqueue.lua"
        path.write_text(script)
        out = subprocess.run(
            [
                "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                f"--timeout={timeout_s:g}s", "-s", str(path), url,
            ],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    statuses = {int(s): int(n) for s, n in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M)}

    def field_of(name: str) -> list[int]:
        match = re.search(rf"^{name} ([\d ]+)$", out, re.M)
        if match is None:
            raise RuntimeError(f"wrk printed no {name} line:\n{out}")
        return [int(x) for x in match.group(1).split()]

    requests, duration_us = field_of("REQUESTS")
    p50, p99, worst = field_of("LATENCY_US")
    return WrkResult(
        requests=requests,
        seconds=duration_us / 1e6,
        p50_ms=p50 / 1000,
        p99_ms=p99 / 1000,
        max_ms=worst / 1000,
        timeouts=field_of("TIMEOUTS")[0],
        socket_errors=field_of("SOCKET_ERRORS")[0],
        no_retry_after=field_of("NO_RETRY_AFTER")[0],
        non_2xx=field_of("NON_2XX")[0],
        statuses=statuses,
    )
