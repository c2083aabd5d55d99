"""Translation of ``sqlite3`` exceptions into conveyor errors that say what to do.

Called at the broker boundary (on the database thread), so no ``sqlite3`` exception reaches a
caller.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from conveyor.errors import (
    BrokerError,
    BrokerReadOnly,
    BrokerUnavailable,
    ConfigurationError,
    ConveyorError,
)

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_PERM: Final = 3
_BUSY: Final = 5
_LOCKED: Final = 6
_READONLY: Final = 8
_IOERR: Final = 10
_CORRUPT: Final = 11
_FULL: Final = 13
_CANTOPEN: Final = 14
_NOTADB: Final = 26


def translate(exc: sqlite3.Error, *, path: str, busy_timeout_ms: int) -> ConveyorError:
    """The conveyor error for a ``sqlite3`` failure on the database at ``path``."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary in (_BUSY, _LOCKED) or "locked" in text or "busy" in text:
        return BrokerReadOnly(
            f"SQLite database {path} is locked by another writer: another process held its write "
            f"lock for longer than busy_timeout ({busy_timeout_ms} ms). Find the process holding "
            "the lock (a long transaction, a sqlite3 shell, a backup tool) and end it, or raise "
            "busy_timeout_ms in the broker URL (e.g. ?busy_timeout_ms=30000)."
        )
    if primary in (_READONLY, _PERM) or "readonly" in text:
        return BrokerReadOnly(
            f"SQLite database {path} is read-only ({text}). Make the file and its directory "
            "writable by this user (SQLite writes -wal and -shm files next to it), or open it "
            "without ?mode=ro."
        )
    if primary == _NOTADB:
        return ConfigurationError(
            f"{path} is not a SQLite database (or it is encrypted); point the broker URL at a "
            "conveyor database file or at a path that does not exist yet."
        )
    if primary == _CORRUPT:
        return BrokerUnavailable(
            f"SQLite database {path} is corrupt ({text}); restore it from a backup, or check it "
            "with `sqlite3 FILE 'PRAGMA integrity_check'`."
        )
    if primary == _FULL:
        return BrokerUnavailable(
            f"SQLite database {path}: the disk is full ({text}); free space, then retry."
        )
    if primary == _CANTOPEN:
        return BrokerUnavailable(
            f"cannot open SQLite database {path} ({text}); check that the file and its directory "
            "exist and are accessible to this user."
        )
    if primary == _IOERR:
        return BrokerUnavailable(
            f"disk I/O error on SQLite database {path} ({text}); check the disk and the file "
            "system (a network file system does not support SQLite's locking), then retry."
        )
    return BrokerError(f"SQLite database {path}: {type(exc).__name__}: {text}")
