"""Redis Cluster support of the broker: the script runner for a cluster client.

A broker URL with ``?cluster=true`` (``redis://seed-host:port/0?cluster=true``, or
``rediss://...``) names one node of a Redis Cluster; the broker then talks to it through
redis-py's :class:`~redis.asyncio.RedisCluster`, which learns the slot map from the seed and
sends each command to the master of its keys' slot.

Nothing in the key schema changes (see :mod:`.keys`): every key of a queue carries the hash tag
``{PREFIX:QUEUE}`` and the global keys (id index, queue set, sequence counter) the tag
``{PREFIX}``, so each transition's script touches one slot, and a queue's multi-key reads
(MULTI/EXEC pipelines) stay on one node. What differs on a cluster (the broker sets
``multi_queue_commands`` off):

* enqueue takes two steps, ``index_jobs`` on the global slot then ``enqueue`` on the queue's
  (see :mod:`.enqueue`), instead of the single-node ``index_and_enqueue`` that spans both;
* waits (BLPOP) and event reads (XREAD) issue one command per queue (see :mod:`.events`);
* scripts run through the cluster client (:class:`ClusterScripts`), not the single-node lane,
  and the client refuses, before sending, a script call whose keys span slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from redis._parsers import AsyncCommandsParser
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import NoScriptError

from conveyor.brokers.redis.scripts import load_sources, script_sha


class ClusterScripts:
    """The broker's Lua scripts, run through a cluster client on the master of their slot.

    The interface is :class:`~conveyor.brokers.redis.scripts.Scripts`'s. EVALSHA first, EVAL
    (which also caches the script on that node) on NOSCRIPT: the first call on a node, or on a
    node restarted or added since.
    """

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._sources = load_sources()
        self._shas = {name: script_sha(source) for name, source in self._sources.items()}

    def sha(self, name: str) -> str:
        """The SHA1 that EVALSHA names script ``name`` by."""
        return self._shas[name]

    async def load(self) -> None:
        """Nothing up front: a node caches a script at its first use there (EVAL on NOSCRIPT).

        Loading every script on every master at connect cost a connection per script and node
        (redis-py runs each SCRIPT LOAD on all nodes at once), which dwarfed the one extra round
        trip of each script's first call on a node.
        """

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` with ``keys`` (all of one slot) and ``args``."""
        client = self._client
        try:
            return await client.execute_command(
                "EVALSHA", self._shas[name], len(keys), *keys, *args
            )
        except NoScriptError:
            return await client.execute_command(
                "EVAL", self._sources[name], len(keys), *keys, *args
            )

    async def close(self) -> None:
        """Nothing of its own to close: the connections are the client's."""


class _SharedCommandTable(AsyncCommandsParser):
    """redis-py's key finder, with the server's COMMAND table fetched once per process and seed.

    The cluster client reads ``COMMAND`` (the key positions of some 240 commands) each time it
    connects; decoding that reply took ~0.1 s of event-loop time per connect, more than the rest
    of a broker connect together. Nodes of one cluster share one table.
    """

    _tables: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, seed: str) -> None:
        super().__init__()
        self._seed = seed

    async def initialize(self, node: ClusterNode | None = None) -> None:
        """Reuse the seed's table if this process has read it, else read COMMAND."""
        table = self._tables.get(self._seed)
        if table is None:
            await super().initialize(node)
            self._tables[self._seed] = self.commands
            return
        if node is not None:
            self.node = node
        self.commands = table


def share_command_table(client: RedisCluster, seed: str) -> None:
    """Make ``client`` reuse the COMMAND table other clients seeded by ``seed`` have read."""
    client.commands_parser = _SharedCommandTable(seed)
