"""The SQLite file behind a broker: one connection, owned by one dedicated thread, and its schema.

Every SQLite call runs on that thread, so the event loop never blocks on disk or on another
process's lock. Calls queue up in submission order (a single-thread executor), which also
serialises this process's transactions without any lock of our own; other processes are kept out
by ``BEGIN IMMEDIATE`` plus ``busy_timeout``. A caller cancelled while its call runs does not undo
it: the transaction still commits (e.g. a cancelled ``reserve`` leaves leases that
``requeue_expired`` recovers), which is the at-least-once contract.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from typing import Concatenate, Final, ParamSpec, TypeVar
from urllib.parse import quote

from conveyor.brokers.sqlite.options import SQLiteOptions
from conveyor.brokers.sqlite.queries import QUERIES, SCHEMA
from conveyor.brokers.sqlite.translate import translate
from conveyor.errors import BrokerReadOnly, BrokerUnavailable, ConfigurationError

#: The schema this code writes; files with a newer one are refused (see schema.sql).
SCHEMA_VERSION: Final = 1
#: UPDATE ... RETURNING and UPDATE ... FROM need SQLite 3.35.
MIN_SQLITE_VERSION: Final = (3, 35, 0)

P = ParamSpec("P")
T = TypeVar("T")
Q: Final = QUERIES


def check_sqlite_version(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse a SQLite library older than :data:`MIN_SQLITE_VERSION`, saying what to do."""
    if version < MIN_SQLITE_VERSION:
        found = ".".join(map(str, version))
        need = ".".join(map(str, MIN_SQLITE_VERSION))
        raise ConfigurationError(
            f"the SQLite broker needs SQLite >= {need} (for UPDATE ... RETURNING), but Python is "
            f"linked against SQLite {found}; use a newer Python build or system libsqlite3, or "
            "use the Redis broker"
        )


class Database:
    """One SQLite file seen through one connection that only the database thread touches.

    Args:
        options: path and connection settings.
        payload_format: the codec format (``json``/``msgpack``) recorded in, and checked
            against, the file.
    """

    def __init__(self, options: SQLiteOptions, *, payload_format: str) -> None:
        self.options = options
        self._payload_format = payload_format
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # only touched on the database thread
        self._open_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        """True between a successful :meth:`open` and :meth:`close`."""
        return self._executor is not None

    # -- lifecycle (event loop side) -------------------------------------------------------------

    async def open(self) -> None:
        """Start the thread, open the file and create or check the schema; idempotent."""
        async with self._open_lock:
            if self._executor is not None:
                return
            check_sqlite_version()
            executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="conveyor-sqlite"
            )
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self._open_sync)
            except BaseException:
                # Queued behind the open, so it also closes a connection a cancelled open made.
                executor.submit(self._close_sync)
                executor.shutdown(wait=False)
                raise
            self._executor = executor

    async def close(self) -> None:
        """Close the connection and stop the thread; idempotent, never raises.

        Waits for calls already queued (each bounded by ``busy_timeout``), then closes.
        """
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)

    # -- calls (event loop side) -----------------------------------------------------------------

    async def write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(conn, ...)`` on the thread inside one ``BEGIN IMMEDIATE`` transaction."""
        return await asyncio.wrap_future(self.submit(True, fn, *args, **kwargs))

    async def read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(conn, ...)`` on the thread inside one read transaction (one snapshot)."""
        return await asyncio.wrap_future(self.submit(False, fn, *args, **kwargs))

    def submit(
        self,
        write: bool,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> concurrent.futures.Future[T]:
        """Queue a call on the thread now (calls run in submission order); returns its future."""
        executor = self._executor
        if executor is None:
            raise BrokerUnavailable(
                f"the SQLite broker for {self.options.path} is not connected; call connect() "
                "first (or use it as an async context manager)"
            )
        return executor.submit(self._run, write, lambda conn: fn(conn, *args, **kwargs))

    # -- database thread -------------------------------------------------------------------------

    def _run(self, write: bool, call: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise BrokerUnavailable(f"the SQLite broker for {self.options.path} is closed")
        try:
            conn.execute(Q["begin_immediate" if write else "begin_deferred"])
            try:
                result = call(conn)
                conn.execute(Q["commit"])
            except BaseException:
                self._rollback(conn)
                raise
            return result
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        # SQLite rolls back by itself after some errors (disk full, I/O); then there is nothing
        # left to roll back and ROLLBACK would fail, hiding the real error.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute(Q["rollback"])

    def _translate(self, exc: sqlite3.Error) -> Exception:
        return translate(exc, path=self.options.path, busy_timeout_ms=self.options.busy_timeout_ms)

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _open_sync(self) -> None:
        created = self._prepare_file()
        with _first_open_lock(os.path.dirname(self.options.path), self.options):
            self._connect(created)

    def _connect(self, created: bool) -> None:
        conn: sqlite3.Connection | None = None
        try:
            mode = "ro" if self.options.read_only else "rw"  # rw: never let SQLite create it
            conn = sqlite3.connect(
                f"file:{quote(self.options.path)}?mode={mode}",
                uri=True,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                timeout=self.options.busy_timeout_ms / 1000,
                cached_statements=256,
            )
            self._init(conn)
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            if created:  # bad input writes nothing: remove the file we made
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(OSError):
                        os.unlink(self.options.path + suffix)
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc) from exc
            raise
        self._conn = conn

    def _prepare_file(self) -> bool:
        """Check the path and create the file with mode 0600 if needed; True if created."""
        path = self.options.path
        if os.path.isdir(path):
            raise ConfigurationError(
                f"{path} is a directory; the SQLite broker URL must name a file, "
                f"e.g. sqlite:///{os.path.join(path, 'conveyor.db')}"
            )
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise ConfigurationError(
                f"cannot create SQLite database {path}: the directory {parent} does not exist; "
                "create it first or fix the path in the broker URL"
            )
        if os.path.exists(path):
            return False
        if self.options.read_only:
            raise ConfigurationError(
                f"SQLite database {path} does not exist, and a read-only (?mode=ro) broker does "
                "not create it; open it read-write once, or fix the path"
            )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process just created it
            return False
        except PermissionError as exc:
            raise BrokerReadOnly(
                f"cannot create SQLite database {path}: {exc.strerror}; make {parent} writable "
                "by this user or choose another path"
            ) from None
        except OSError as exc:
            raise BrokerUnavailable(f"cannot create SQLite database {path}: {exc}") from None
        try:
            if hasattr(os, "fchmod"):  # exactly 0600 whatever the umask: jobs may be private
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        return True

    def _init(self, conn: sqlite3.Connection) -> None:
        """Check (or create) the schema; writes nothing until the file is known to be ours."""
        path = self.options.path
        tables = self._tables(conn)  # a non-SQLite file fails here (SQLITE_NOTADB), unchanged
        if tables:
            self._check_schema(conn, tables)
        elif self.options.read_only:
            raise ConfigurationError(
                f"SQLite database {path} has no conveyor schema and a read-only (?mode=ro) broker "
                "cannot create it; open it read-write once"
            )
        if self.options.read_only:
            return
        if conn.execute(Q["journal_mode"]).fetchone()[0] != "wal":
            mode = conn.execute(Q["journal_mode_wal"]).fetchone()[0]
            if mode != "wal":
                raise ConfigurationError(
                    f"SQLite database {path} cannot use WAL mode (got {mode!r}); keep it on a "
                    "local file system"
                )
        full = self.options.synchronous == "full"
        conn.execute(Q["synchronous_full" if full else "synchronous_normal"])
        if not tables:
            self._run_create(conn)

    def _run_create(self, conn: sqlite3.Connection) -> None:
        conn.execute(Q["begin_immediate"])
        try:
            tables = self._tables(conn)  # another process may have created it meanwhile
            if tables:
                self._check_schema(conn, tables)
            else:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(Q["insert_schema_version"], {"version": SCHEMA_VERSION})
                conn.execute(
                    Q["put_setting"], {"name": "payload_format", "value": self._payload_format}
                )
            conn.execute(Q["commit"])
        except BaseException:
            self._rollback(conn)
            raise

    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set[str]:
        return {name for (name,) in conn.execute(Q["table_names"])}

    def _check_schema(self, conn: sqlite3.Connection, tables: set[str]) -> None:
        path = self.options.path
        if "schema_version" not in tables or "jobs" not in tables:
            raise ConfigurationError(
                f"{path} is a SQLite database of another application (tables: "
                f"{', '.join(sorted(tables))}); point the broker URL at a conveyor database or at "
                "a path that does not exist yet"
            )
        (version,) = conn.execute(Q["schema_version"]).fetchone()
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"SQLite database {path} has conveyor schema version {version}, newer than this "
                f"conveyor supports ({SCHEMA_VERSION}); upgrade conveyor (pip install -U conveyor) "
                "on every machine that opens this file"
            )
        # Older versions would be migrated here, inside BEGIN IMMEDIATE; version 1 is the first.
        row = conn.execute(Q["get_setting"], {"name": "payload_format"}).fetchone()
        stored = row[0] if row else None
        if stored != self._payload_format:
            raise ConfigurationError(
                f"SQLite database {path} stores payloads as {stored!r} but this broker's codec is "
                f"{self._payload_format!r}; open it with Codec(format={stored!r})"
            )


if sys.platform == "win32":  # pragma: no cover - no flock; processes should not race a new file

    @contextlib.contextmanager
    def _first_open_lock(directory: str, options: SQLiteOptions) -> Iterator[None]:
        yield

else:
    import fcntl

    @contextlib.contextmanager
    def _first_open_lock(directory: str, options: SQLiteOptions) -> Iterator[None]:
        """Let one process at a time run the open sequence (schema check, WAL switch, schema).

        SQLite cannot switch a new file to WAL while another process has it open in rollback
        mode: processes starting together on a new file would fail with "database is locked" or
        "disk I/O error". The lock is a ``flock`` on the directory, not on the database: closing
        any descriptor of the database file would drop the POSIX locks SQLite holds on it for
        this process. Bounded by ``busy_timeout_ms``, like any other wait for another process.
        """
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # an unreadable directory: go without; SQLite's own errors still apply
            yield
            return
        try:
            deadline = time.monotonic() + options.busy_timeout_ms / 1000
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise BrokerReadOnly(
                            f"SQLite database {options.path}: another process kept opening it "
                            f"for longer than busy_timeout ({options.busy_timeout_ms} ms); "
                            "retry, or raise busy_timeout_ms in the broker URL"
                        ) from None
                    time.sleep(0.005)
            yield  # closing fd below releases the flock
        finally:
            os.close(fd)
