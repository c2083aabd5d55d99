"""SQLite broker settings and the ``sqlite://`` URL that carries them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from conveyor.errors import ConfigurationError

Synchronous = Literal["normal", "full"]

DEFAULT_BUSY_TIMEOUT_MS: Final = 5000
DEFAULT_POLL_INTERVAL_MS: Final = 50
_URL_HELP: Final = (
    "use sqlite:///relative/path.db or sqlite:////absolute/path.db, optionally with "
    "?synchronous=normal|full&busy_timeout_ms=5000&poll_interval_ms=50&mode=rw|ro"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SQLiteOptions:
    """How the SQLite broker opens and uses its file.

    Attributes:
        path: the database file (made absolute, so a later ``chdir`` does not move it).
        synchronous: ``normal`` (default) makes every commit survive a crash of the process; the
            last commits may be lost on power loss or an OS crash. ``full`` fsyncs every commit,
            so an acknowledged transition survives power loss too, at a cost in throughput.
        busy_timeout_ms: how long a transition waits for another process's write lock before
            failing with :class:`~conveyor.errors.BrokerReadOnly`.
        poll_interval_ms: how often ``wait_for_jobs`` and ``subscribe`` look for changes made by
            other processes (SQLite has no notifications; changes made through this broker wake
            them at once).
        read_only: open the file read-only (``?mode=ro``): reads work, transitions raise
            :class:`~conveyor.errors.BrokerReadOnly`, and the file must already exist.
    """

    path: str
    synchronous: Synchronous = "normal"
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
    poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS
    read_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or self.path == ":memory:":
            raise ConfigurationError(
                f"invalid SQLite path {self.path!r}; give a file path "
                "(use memory:// for an in-memory broker)"
            )
        if "\x00" in self.path:
            raise ConfigurationError("SQLite path contains a NUL character; give a file path")
        object.__setattr__(self, "path", os.path.abspath(self.path))
        if self.synchronous not in ("normal", "full"):
            raise ConfigurationError(
                f"invalid synchronous={self.synchronous!r}; use 'normal' (survives a process "
                "crash) or 'full' (survives power loss)"
            )
        _check_int("busy_timeout_ms", self.busy_timeout_ms, minimum=0)
        _check_int("poll_interval_ms", self.poll_interval_ms, minimum=1)
        if not isinstance(self.read_only, bool):
            raise ConfigurationError(f"read_only must be True or False, got {self.read_only!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _int_param(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(
            f"invalid {name}={raw!r} in the SQLite URL; give a whole number of milliseconds"
        ) from None


def parse_url(url: str) -> dict[str, Any]:
    """Parse a ``sqlite://`` URL into :class:`SQLiteOptions` keyword arguments (no I/O)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"malformed SQLite URL {url!r}; {_URL_HELP}")
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigurationError(f"malformed SQLite URL {url!r} ({exc}); {_URL_HELP}") from None
    if parts.scheme.lower() != "sqlite":
        raise ConfigurationError(f"not a SQLite URL: {url!r}; {_URL_HELP}")
    if parts.netloc:
        raise ConfigurationError(
            f"malformed SQLite URL {url!r}: a SQLite URL has no host ({parts.netloc!r}); "
            f"{_URL_HELP}"
        )
    if parts.fragment:
        raise ConfigurationError(f"malformed SQLite URL {url!r}: unexpected '#'; {_URL_HELP}")
    # sqlite:///rel.db has path "/rel.db" and sqlite:////abs.db has "//abs.db": drop one slash.
    path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not path or path.endswith("/"):
        raise ConfigurationError(f"malformed SQLite URL {url!r}: no file name; {_URL_HELP}")
    options: dict[str, Any] = {"path": path}
    _parse_query(url, query, options)
    return options


def _parse_query(url: str, query: list[tuple[str, str]], options: dict[str, Any]) -> None:
    seen: set[str] = set()
    for name, raw in query:
        if name in seen:
            raise ConfigurationError(f"{name} is given twice in the SQLite URL {url!r}")
        seen.add(name)
        if name == "synchronous":
            options[name] = raw.lower()
        elif name in ("busy_timeout_ms", "poll_interval_ms"):
            options[name] = _int_param(name, raw)
        elif name == "mode":
            if raw not in ("rw", "ro"):
                raise ConfigurationError(f"invalid mode={raw!r} in the SQLite URL; use rw or ro")
            options["read_only"] = raw == "ro"
        else:
            raise ConfigurationError(
                f"unknown SQLite URL parameter {name!r}; known: synchronous, busy_timeout_ms, "
                "poll_interval_ms, mode"
            )
