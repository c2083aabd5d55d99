"""A private 3-master Redis Cluster on free loopback ports, for tests and chaos scenarios.

Three ``redis-server --cluster-enabled yes`` processes (:class:`~.redis_server.RedisServer`,
each with its ``nodes.conf`` in its own directory) are joined by
``redis-cli --cluster create ... --cluster-replicas 0``, which splits the 16384 slots over them.
:meth:`RedisCluster.start` returns once every node reports ``cluster_state:ok``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from types import TracebackType
from typing import Any, Self

import redis

from conveyor.testing.redis_server import RedisServer, free_port


def redis_cli_binary() -> str | None:
    """The path of ``redis-cli``, or None if it is not installed."""
    return shutil.which("redis-cli")


class RedisCluster:
    """Three cluster-enabled masters on 127.0.0.1, no replicas.

    Args:
        masters: how many masters (at least 3, which ``redis-cli --cluster create`` requires).
        appendfsync: ``always`` or ``everysec`` turns on AOF on every node.
    """

    def __init__(self, masters: int = 3, *, appendfsync: str | None = None) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        cli = redis_cli_binary()
        if cli is None:
            raise RuntimeError("redis-cli is not installed (Debian: apt-get install redis-tools)")
        self.cli = cli
        self.nodes = [
            RedisServer(
                appendfsync=appendfsync,
                # The cluster bus defaults to port + 10000, which may be taken or past 65535.
                # node-timeout only matters for failover, which a replica-less cluster never
                # does; a short one lets a restarted node rejoin quickly.
                extra_args=[
                    *("--cluster-enabled", "yes"),
                    *("--cluster-config-file", "nodes.conf"),
                    *("--cluster-port", str(free_port())),
                    *("--cluster-node-timeout", "2000"),
                ],
            )
            for _ in range(masters)
        ]
        self._created = False

    @property
    def ports(self) -> list[int]:
        """The masters' ports."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """A broker URL for the cluster: the first master as seed, ``?cluster=true``."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0?cluster=true"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start every node, join them into one cluster (once) and wait for ``cluster_state:ok``."""
        for node in self.nodes:
            node.start()
        if not self._created:
            addresses = [f"127.0.0.1:{port}" for port in self.ports]
            create = [self.cli, "--cluster", "create", *addresses]
            subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout_s,
            )
            self._created = True
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` and knows every other node."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._node_ok(port) for port in self.ports):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on {self.ports} is not ok in {timeout_s} s")
            time.sleep(0.05)

    def _node_ok(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1.0)
        try:
            info = client.cluster("INFO")
            state = info.get("cluster_state")
            known = int(info.get("cluster_known_nodes", 0))
            return bool(state == "ok" and known == len(self.nodes))
        except redis.RedisError:
            return False
        finally:
            client.close()

    def flush(self) -> None:
        """Empty every master (tests only ever point at a disposable cluster)."""
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                client.flushall()
            finally:
                client.close()

    def slot_owners(self) -> dict[int, int]:
        """Slot -> the port of the master that serves it (from ``CLUSTER SHARDS``)."""
        client = redis.Redis(port=self.ports[0])
        try:
            shards: Any = client.execute_command("CLUSTER", "SHARDS")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        owners: dict[int, int] = {}
        for shard in shards:
            [master] = [n for n in shard[b"nodes"] if n[b"role"] == b"master"]
            ranges = shard[b"slots"]
            for start, end in zip(ranges[::2], ranges[1::2], strict=True):
                owners.update(dict.fromkeys(range(int(start), int(end) + 1), int(master[b"port"])))
        return owners

    def crossslot_errors(self) -> dict[int, int]:
        """Per master port, how many commands it refused with CROSSSLOT (``INFO errorstats``)."""
        out: dict[int, int] = {}
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                stats = client.info("errorstats")
            finally:
                client.close()
            out[port] = int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
        return out

    def close(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
