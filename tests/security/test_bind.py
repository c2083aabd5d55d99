"""X1: `conveyor serve` binds 127.0.0.1 by default and refuses a wider bind without a token.

Every case runs the real ``conveyor`` command in its own process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conveyor.testing.redis_server import free_port

from .conftest import TOKEN, conveyor_env

CONVEYOR = str(Path(sys.executable).with_name("conveyor"))
#: uvicorn re-raises the SIGINT it handled once it has shut down: the CLI exits 130, as for Ctrl-C.
STOPPED_BY_SIGINT = (0, 130)


def _serve(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [CONVEYOR, "--broker", "memory://", "serve", "--log-level", "warning", *args]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def _wait_healthy(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            pytest.fail(f"conveyor serve exited with {process.returncode}: {stderr}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "conveyor serve did not become healthy in 20 s"
        time.sleep(0.05)


def _stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    stderr = process.stderr.read() if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    return stderr


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the listening TCP sockets on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_default_bind_is_loopback_only() -> None:
    port = free_port()
    process = _serve("--port", str(port), env=conveyor_env())
    try:
        _wait_healthy(process, port)
        # 127.0.0.1 as /proc writes it (little-endian hex): nothing listens on 0.0.0.0 or ::.
        assert _listening_addresses(port) == {"0100007F"}
        # No token configured on loopback: the API answers without one.
        assert httpx.get(f"http://127.0.0.1:{port}/jobs", timeout=5).status_code == 200
    finally:
        stderr = _stop(process)
    assert process.returncode in STOPPED_BY_SIGINT, stderr
    assert "Traceback" not in stderr, stderr


def test_a_non_loopback_bind_without_a_token_refuses_to_start() -> None:
    # An empty $CONVEYOR_TOKEN counts as none. (Other addresses: tests/service/test_security.py.)
    cases = [("0.0.0.0", None), ("::", "")]
    processes = [  # in parallel: each is a Python start-up
        _serve(
            "--host",
            host,
            "--port",
            str(free_port()),
            env=conveyor_env() if token is None else conveyor_env(CONVEYOR_TOKEN=token),
        )
        for host, token in cases
    ]
    for (host, _), process in zip(cases, processes, strict=True):
        stderr = _stop(process) if process.wait(30) is not None else ""
        assert process.returncode == 1, (host, stderr)
        assert f"refusing to listen on {host} without a token" in stderr, stderr
        assert "CONVEYOR_TOKEN" in stderr  # says how to fix it
        assert "Traceback" not in stderr


def test_a_non_loopback_bind_with_a_token_starts_and_requires_it() -> None:
    port = free_port()
    process = _serve(
        "--host", "0.0.0.0", "--port", str(port), env=conveyor_env(CONVEYOR_TOKEN=TOKEN)
    )
    try:
        _wait_healthy(process, port)  # through loopback, which 0.0.0.0 includes
        assert _listening_addresses(port) == {"00000000"}
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/jobs", timeout=5).status_code == 401
        ok = httpx.get(f"{base}/jobs", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert ok.status_code == 200
    finally:
        stderr = _stop(process)
    assert process.returncode in STOPPED_BY_SIGINT, stderr
    assert "Traceback" not in stderr, stderr
    assert TOKEN not in stderr
