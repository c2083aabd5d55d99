"""Opening a file: created 0600 with WAL, and every kind of bad file refused clearly, unchanged."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.brokers.sqlite.connection import SCHEMA_VERSION, check_sqlite_version
from conveyor.codec import Codec
from conveyor.errors import BrokerReadOnly, BrokerUnavailable, ConfigurationError
from conveyor.job import Job, JobState, new_job_id


def _job() -> Job:
    return Job(id=new_job_id(), task="tests.noop", queue="q")


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` and its bytes (what "nothing was written" compares)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


async def _make_db(path: Path, jobs: int = 1) -> None:
    async with SQLiteBroker(str(path)) as broker:
        await broker.enqueue([_job() for _ in range(jobs)])


@pytest.fixture
def other_connection(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "conveyor.db", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


async def test_a_new_file_is_created_with_mode_0600_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    old_umask = os.umask(0o022)
    try:
        await _make_db(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()


async def test_synchronous_setting_is_applied_to_the_connection(tmp_path: Path) -> None:
    def synchronous(conn: sqlite3.Connection) -> int:
        value: int = conn.execute("PRAGMA synchronous").fetchone()[0]
        return value

    for setting, expected in (("normal", 1), ("full", 2)):
        async with SQLiteBroker(str(tmp_path / "s.db"), synchronous=setting) as broker:  # type: ignore[arg-type]
            assert await broker._db.read(synchronous) == expected


async def test_connect_and_close_are_idempotent_and_use_after_close_is_a_clear_error(
    tmp_path: Path,
) -> None:
    broker = SQLiteBroker(str(tmp_path / "x.db"))
    await broker.connect()
    await broker.connect()
    await broker.ping()
    await broker.close()
    await broker.close()
    with pytest.raises(BrokerUnavailable, match="not connected; call connect"):
        await broker.get("x")
    await broker.connect()  # usable again
    assert await broker.queues() == []
    await broker.close()


async def test_a_directory_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    broker = SQLiteBroker(str(tmp_path / "adir"))
    with pytest.raises(ConfigurationError, match="is a directory; the SQLite broker URL must name"):
        await broker.connect()
    assert list((tmp_path / "adir").iterdir()) == []


async def test_a_missing_parent_directory_is_refused_and_not_created(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "missing" / "x.db"))
    with pytest.raises(ConfigurationError, match=r"directory .*missing does not exist; create it"):
        await broker.connect()
    assert list(tmp_path.iterdir()) == []


async def test_a_file_that_is_not_sqlite_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    before = _snapshot(tmp_path)
    broker = SQLiteBroker(str(path))
    with pytest.raises(ConfigurationError, match="is not a SQLite database"):
        await broker.connect()
    assert _snapshot(tmp_path) == before


async def test_a_sqlite_file_of_another_application_is_refused_and_left_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigurationError, match=r"another application \(tables: users\)"):
        await SQLiteBroker(str(path)).connect()
    assert _snapshot(tmp_path) == before


async def test_a_file_with_a_newer_schema_version_is_refused_and_left_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "conveyor.db"
    await _make_db(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigurationError, match=r"newer than this conveyor supports.*upgrade"):
        await SQLiteBroker(str(path)).connect()
    assert _snapshot(tmp_path) == before


async def test_a_file_written_with_another_codec_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.db"
    await _make_db(path)
    with pytest.raises(ConfigurationError, match=r"stores payloads as 'json'.*format='json'"):
        await SQLiteBroker(str(path), codec=Codec("msgpack")).connect()


async def test_read_only_mode_reads_but_refuses_writes_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "conveyor.db"
    await _make_db(path, jobs=2)
    before = _snapshot(tmp_path)
    async with SQLiteBroker.from_url(f"sqlite:///{path}?mode=ro") as broker:
        assert (await broker.counts("q"))["q"][JobState.QUEUED] == 2
        with pytest.raises(BrokerReadOnly, match=r"read-only.*without \?mode=ro"):
            await broker.enqueue([_job()])
        with pytest.raises(BrokerReadOnly):
            await broker.reserve("q", 1, lease_s=30)
        assert (await broker.counts("q"))["q"][JobState.QUEUED] == 2
    after = _snapshot(tmp_path)
    assert after["conveyor.db"] == before["conveyor.db"]
    # SQLite leaves an empty WAL (and its index) behind a read-only reader: no data in it
    assert after.get("conveyor.db-wal", b"") == b""


async def test_read_only_mode_does_not_create_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist, and a read-only"):
        await SQLiteBroker(str(tmp_path / "x.db"), read_only=True).connect()
    assert list(tmp_path.iterdir()) == []


async def test_a_write_lock_held_past_busy_timeout_is_broker_read_only_not_sqlite3(
    tmp_path: Path, other_connection: sqlite3.Connection
) -> None:
    path = tmp_path / "conveyor.db"
    await _make_db(path)
    async with SQLiteBroker(str(path), busy_timeout_ms=100) as broker:
        other_connection.execute("BEGIN EXCLUSIVE")  # another writer holds the lock
        try:
            with pytest.raises(BrokerReadOnly, match=r"locked by another writer.*busy_timeout_ms"):
                await broker.enqueue([_job()])
            with pytest.raises(BrokerReadOnly) as info:
                await broker.reserve("q", 5, lease_s=30)
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)  # chained, not raised
            # reads keep working under WAL while the writer holds its lock
            assert (await broker.counts("q"))["q"][JobState.QUEUED] == 1
        finally:
            other_connection.execute("ROLLBACK")
        [job] = await broker.reserve("q", 5, lease_s=30)  # and writes resume once it is gone
        await broker.ack(job.lease)


async def test_a_lock_held_briefly_is_waited_for_within_busy_timeout(
    tmp_path: Path, other_connection: sqlite3.Connection
) -> None:
    import asyncio

    path = tmp_path / "conveyor.db"
    await _make_db(path)
    async with SQLiteBroker(str(path), busy_timeout_ms=5000) as broker:
        other_connection.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.2, other_connection.execute, "ROLLBACK")
        assert len(await broker.reserve("q", 5, lease_s=30)) == 1


async def test_waiting_for_a_lock_does_not_block_the_event_loop(
    tmp_path: Path, other_connection: sqlite3.Connection
) -> None:
    import asyncio
    import time

    path = tmp_path / "conveyor.db"
    await _make_db(path)
    async with SQLiteBroker(str(path), busy_timeout_ms=400) as broker:
        other_connection.execute("BEGIN EXCLUSIVE")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            with pytest.raises(BrokerReadOnly):
                await broker.enqueue([_job()])
        finally:
            task.cancel()
            other_connection.execute("ROLLBACK")
        assert time.monotonic() - started >= 0.35
        assert ticks >= 10  # the loop kept running while the thread waited on the lock


NOBODY = 65534


async def _expect_read_only(path: Path) -> None:
    with pytest.raises(BrokerReadOnly, match="read-only"):
        async with SQLiteBroker(str(path)) as broker:
            await broker.enqueue([_job()])


async def test_a_write_protected_file_is_broker_read_only(tmp_path: Path) -> None:
    """A file the process may read but not write. As root (CI), DAC is bypassed, so the check
    runs in a forked child that has dropped to an unprivileged user owning a 0400 file."""
    import asyncio
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="conveyor-ro-"))
    try:
        path = directory / "conveyor.db"
        await _make_db(path)
        path.chmod(0o400)
        before = _snapshot(directory)
        if os.geteuid() != 0:
            await _expect_read_only(path)
        else:
            directory.chmod(0o777)  # the unprivileged child may create -wal/-shm beside it
            os.chown(path, NOBODY, NOBODY)
            pid = os.fork()
            if pid == 0:  # child: drop privileges, then try to write
                code = 1
                try:
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    asyncio.run(_expect_read_only(path))
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged write was not refused"
        after = _snapshot(directory)
        assert after[path.name] == before[path.name]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_an_old_sqlite_library_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigurationError, match=r"SQLite >= 3\.35.*linked against SQLite 3\.31"):
        check_sqlite_version((3, 31, 1))
    check_sqlite_version((3, 35, 0))
