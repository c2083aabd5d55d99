"""The Lua scripts of the Redis broker: read from ``lua/*.lua`` once, run on a lean lane.

Each transition is one file named after it (``ack.lua``, ``reserve.lua``, ...). A line
``-- @include NAME`` is replaced by ``lua/includes/NAME.lua`` (the shared prelude and helpers),
so the source sent to Redis is self-contained. Scripts run with EVALSHA and fall back to EVAL
(which also caches the source) on NOSCRIPT (a restarted or flushed server).

Why a lane of its own: scripts are the transitions, and reserve/ack sit on the worker's
critical path. redis-py's client path costs several event-loop turns and ~0.1-0.2 ms of Python
per command (a pool lock, a helper task per send under ``asyncio.wait_for``, observability
hooks); measured after a 10 ms idle gap (a worker waiting on its jobs: cold caches), a PING took
0.34 ms through the client and 0.13 ms straight on a connection. So scripts go straight to
``redis.asyncio`` connections of the client's pool class and settings, bounded by one
``asyncio.timeout`` of the socket timeout per call. A connection whose call did not end with a
complete reply (timeout, cancellation, network error) is dropped, never reused; an idle one is
checked before reuse as the pool would (EOF or stray data: replaced; health-check PING after
``health_check_interval_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

#: Every script, by the transition (or step) it implements.
SCRIPT_NAMES: Final = (
    "index_jobs",
    "enqueue",
    "index_and_enqueue",
    "start",
    "reserve",
    "extend_lease",
    "ack",
    "ack_and_reserve",
    "retry",
    "dead_letter",
    "release",
    "requeue_expired",
    "promote_scheduled",
    "cancel",
    "delete",
    "redrive",
    "purge",
    "cleanup",
    "set_progress",
    "append_log",
)

_INCLUDE: Final = re.compile(r"^-- @include (\w+)[ \t]*$", re.MULTILINE)


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


def _resolve(source: str, seen: tuple[str, ...] = ()) -> str:
    """Splice ``-- @include NAME`` lines, refusing cycles."""

    def splice(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            raise RuntimeError(f"Lua include cycle: {' -> '.join((*seen, name))}")
        return _resolve(_read(f"includes/{name}.lua"), (*seen, name))

    return _INCLUDE.sub(splice, source)


@functools.cache
def load_sources() -> dict[str, str]:
    """Every script's full source (includes resolved), read from the package once per process."""
    return {name: _resolve(_read(f"{name}.lua")) for name in SCRIPT_NAMES}


#: Idle lane connections kept for reuse (more run concurrently; the extra ones are closed).
MAX_IDLE: Final = 8
#: Packed command heads kept (one per script and queue in use).
MAX_CACHED_HEADS: Final = 4096


class Scripts:
    """The scripts, run on a lane of connections of ``client``'s pool class and settings.

    Args:
        client: the broker's client (its pool's connection settings are reused).
        timeout_s: the bound on one script call (the broker's socket timeout).
    """

    def __init__(self, client: Redis, *, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._sources = load_sources()
        self._shas = {name: script_sha(source) for name, source in self._sources.items()}
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        # The lane bounds each call itself, so its connections need no socket timeout (which
        # would make redis-py send through asyncio.wait_for and a helper task).
        self._connection_kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self._idle: list[AbstractConnection] = []
        self._closed = False
        self._heads: dict[tuple[str, str, tuple[str, ...]], bytes] = {}

    def sha(self, name: str) -> str:
        """The SHA1 that EVALSHA names script ``name`` by."""
        return self._shas[name]

    async def load(self) -> None:
        """Load every script into the server's cache (one round trip), so EVALSHA hits at once."""
        async with self._client.pipeline(transaction=False) as pipe:
            for source in self._sources.values():
                pipe.script_load(source)
            await pipe.execute()

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` with ``keys`` and ``args`` (EVALSHA, NOSCRIPT -> EVAL)."""
        conn = await self._take()
        reusable = False
        try:
            async with asyncio.timeout(self._timeout_s):
                if not conn.is_connected:
                    await conn.connect()  # type: ignore[no-untyped-call]
                try:
                    reply = await self._call(conn, "EVALSHA", self._shas[name], keys, args)
                except NoScriptError:
                    reply = await self._call(conn, "EVAL", self._sources[name], keys, args)
            reusable = True
            return reply
        except ResponseError:
            reusable = True  # a complete error reply: the connection is in step
            raise
        finally:
            self._give_back(conn, reusable)

    async def _call(
        self,
        conn: AbstractConnection,
        command: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
    ) -> Any:
        await conn.send_packed_command(self._pack(conn, command, script, keys, args))
        return await conn.read_response()

    def _pack(
        self,
        conn: AbstractConnection,
        command: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[Any],
    ) -> bytes | list[bytes]:
        """The RESP frame of ``command script numkeys keys... args...``.

        The head (command, script, keys) is encoded once per script and key set and cached:
        redis-py's pack_command re-encodes every key on every call, which was 60% of the
        Python cost of an ack_and_reserve call before it reached the socket.
        """
        head_key = (command, script, tuple(keys))
        head = self._heads.get(head_key)
        if head is None:
            head = b"".join(_bulk(part) for part in (command, script, len(keys), *keys))
            if len(self._heads) < MAX_CACHED_HEADS:
                self._heads[head_key] = head
        try:
            tail = b"".join([_bulk(arg) for arg in args])
        except TypeError:  # a type this packer does not know: let redis-py encode it all
            return conn.pack_command(command, script, len(keys), *keys, *args)
        count = 3 + len(keys) + len(args)
        return b"*%d\r\n%b%b" % (count, head, tail)

    async def _take(self) -> AbstractConnection:
        idle = self._idle
        while idle:
            conn = idle.pop()
            try:
                # The pool's check: EOF (the server closed it) or stray data means replace it.
                if conn.is_connected and not await conn.can_read():
                    return conn
            except (OSError, ConnectionError):
                pass
            _drop(conn)
        return self._connection_class(**self._connection_kwargs)

    def _give_back(self, conn: AbstractConnection, reusable: bool) -> None:
        if reusable and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            _drop(conn)

    async def close(self) -> None:
        """Close the idle connections (calls in flight drop theirs when they end)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()


def _bulk(value: Any) -> bytes:
    """One RESP bulk string, encoded as redis-py's encoder would (UTF-8, ints and floats)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int) and not isinstance(value, bool):
        data = b"%d" % value
    elif isinstance(value, float):
        data = repr(value).encode()
    else:
        raise TypeError(f"cannot pack {type(value).__name__}")
    return b"$%d\r\n%b\r\n" % (len(data), data)


def script_sha(source: str) -> str:
    """The SHA1 that EVALSHA names a script by."""
    return hashlib.sha1(source.encode()).hexdigest()  # Redis names scripts by their SHA1


def _drop(conn: AbstractConnection) -> None:
    """Close a lane connection at once, without waiting (it may be mid-reply)."""
    with contextlib.suppress(Exception):
        conn._close()  # type: ignore[no-untyped-call]  # redis-py's own synchronous close
        conn._parser.on_disconnect()  # type: ignore[no-untyped-call]
