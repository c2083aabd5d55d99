"""The ledger and checker on hand-written records, and the fault proxy against an echo server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from conveyor.testing.faults import FaultProxy, Mode
from conveyor.testing.ledger import Ledger, Producer, check


def test_a_clean_run_is_ok(tmp_path: Path) -> None:
    ledger, producer = Ledger(tmp_path), Producer(tmp_path)
    producer.acked_many(["a", "b"])
    for job_id in ("a", "b"):
        ledger.record_start(job_id, 1)
        ledger.record_end(job_id, 1)
        ledger.record_committed(job_id, 1)
    report = check(tmp_path)
    assert report.ok, report.problems()
    assert report.as_row()["executions"] == 2


def test_lost_unexpected_dup_commit_and_hangs_are_problems(tmp_path: Path) -> None:
    ledger, producer = Ledger(tmp_path), Producer(tmp_path)
    producer.acked_many(["lost", "twice"])
    producer.unknown("maybe")
    ledger.record_start("lost", 1)  # started, never ended: lost
    ledger.record_start("stray", 1)  # never enqueued
    ledger.record_end("stray", 1)
    ledger.record_start("maybe", 1)  # unknown outcome that did run: recovered
    ledger.record_end("maybe", 1)
    for attempt in (1, 2):
        ledger.record_start("twice", attempt)
        ledger.record_end("twice", attempt)
        ledger.record_committed("twice", attempt)
    ledger.record_hang("worker 1 did not exit")
    report = check(tmp_path)
    assert report.lost == ["lost"]
    assert report.unexpected == ["stray"]
    assert report.dup_exec == ["twice"]
    assert report.dup_commit == ["twice"]
    assert report.recovered == ["maybe"]
    assert report.hangs == 1
    assert not report.ok


def test_recovery_is_measured_from_the_fault_to_the_last_orphan_restart(tmp_path: Path) -> None:
    Producer(tmp_path).acked_many(["a", "b", "done"])
    victim = Ledger(tmp_path, role="victim")
    driver = Ledger(tmp_path, role="driver")
    victim_pid = os.getpid()
    # Records carry explicit times through the driver API only, so write runs by hand.
    lines = [
        {"k": "start", "id": "a", "attempt": 1, "pid": victim_pid, "t": 10.0},
        {"k": "start", "id": "b", "attempt": 1, "pid": victim_pid, "t": 10.0},
        {"k": "start", "id": "done", "attempt": 1, "pid": victim_pid, "t": 10.0},
        {"k": "end", "id": "done", "attempt": 1, "pid": victim_pid, "t": 11.0, "outcome": "ok"},
        {"k": "start", "id": "a", "attempt": 2, "pid": 2, "t": 14.0},
        {"k": "start", "id": "b", "attempt": 2, "pid": 2, "t": 15.5},
        {"k": "end", "id": "a", "attempt": 2, "pid": 2, "t": 16.0, "outcome": "ok"},
        {"k": "end", "id": "b", "attempt": 2, "pid": 2, "t": 16.0, "outcome": "ok"},
    ]
    for line in lines:
        victim._out.write(dict(line))
    driver.record_fault("sigkill", pid=victim_pid, t=12.0)
    report = check(tmp_path)
    assert report.ok, report.problems()
    assert report.recovery_s == [pytest.approx(3.5)]
    assert report.dup_exec == ["a", "b"]
    assert report.overlaps == []


def test_a_second_live_owner_is_an_overlap(tmp_path: Path) -> None:
    Producer(tmp_path).acked("a")
    out = Ledger(tmp_path)._out
    out.write({"k": "start", "id": "a", "attempt": 1, "pid": 1, "t": 1.0})
    out.write({"k": "start", "id": "a", "attempt": 2, "pid": 2, "t": 2.0})
    out.write({"k": "end", "id": "a", "attempt": 1, "pid": 1, "t": 3.0, "outcome": "ok"})
    out.write({"k": "end", "id": "a", "attempt": 2, "pid": 2, "t": 4.0, "outcome": "ok"})
    assert check(tmp_path).overlaps == ["a"]


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_the_proxy_passes_delays_half_opens_and_resets() -> None:
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    proxy = FaultProxy(("127.0.0.1", port))
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"ping")
        async with asyncio.timeout(2):
            assert await reader.readexactly(4) == b"ping"

        proxy.set_mode(Mode.DELAY, delay_ms=200)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        writer.write(b"slow")
        async with asyncio.timeout(2):
            assert await reader.readexactly(4) == b"slow"
        assert loop.time() - t0 >= 0.35  # delayed both ways

        proxy.set_mode(Mode.HALF_OPEN, apply_to="existing")
        writer.write(b"lost")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.readexactly(4)
        assert not writer.is_closing()  # no FIN, no RST: just silence

        proxy.set_mode(Mode.PASS)
        fresh_reader, fresh_writer = await asyncio.open_connection(*proxy.address)
        fresh_writer.write(b"new!")
        async with asyncio.timeout(2):
            assert await fresh_reader.readexactly(4) == b"new!"

        proxy.set_mode(Mode.RESET)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(2):
                await fresh_reader.readexactly(1)
        writer.close()
        fresh_writer.close()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


def test_the_threaded_proxy_blackholes_new_connections_in_drop_mode() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as upstream:
        target = ("127.0.0.1", upstream.getsockname()[1])
        with FaultProxy.threaded(target) as proxy:
            proxy.set_mode(Mode.DROP)
            with socket.create_connection(proxy.address, timeout=2) as sock:
                sock.sendall(b"anyone?")
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(16)
            upstream.settimeout(0.1)
            with pytest.raises(TimeoutError):
                upstream.accept()  # never connected upstream
