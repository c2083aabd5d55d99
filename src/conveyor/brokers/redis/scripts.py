"""The Lua scripts of the Redis broker: read from ``lua/*.lua`` once, registered per client.

Each transition is one file named after it (``ack.lua``, ``reserve.lua``, ...). A line
``-- @include NAME`` is replaced by ``lua/includes/NAME.lua`` (the shared prelude and helpers),
so the source sent to Redis is self-contained. redis-py's script objects run them with EVALSHA
and fall back to loading the source on NOSCRIPT (a restarted or flushed server).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

#: Every script, by the transition (or step) it implements.
SCRIPT_NAMES: Final = (
    "index_jobs",
    "enqueue",
    "start",
    "reserve",
    "extend_lease",
    "ack",
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


class Scripts:
    """The scripts registered on one client; call ``await scripts.run(name, keys, args)``."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source) for name, source in load_sources().items()
        }

    async def load(self) -> None:
        """Load every script into the server's cache (one round trip), so EVALSHA hits at once."""
        async with self._client.pipeline(transaction=False) as pipe:
            for source in load_sources().values():
                pipe.script_load(source)
            await pipe.execute()

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` with ``keys`` and ``args`` (EVALSHA, NOSCRIPT -> load and retry)."""
        return await self._scripts[name](keys=keys, args=args)
