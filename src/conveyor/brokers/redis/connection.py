"""Redis connections for the broker: URL checking, client options, and exception translation.

Every redis-py exception is translated here, at the boundary: unreachable or timing-out servers
become :class:`~conveyor.errors.BrokerUnavailable`, refused credentials
:class:`~conveyor.errors.ConfigurationError`, a read-only replica
:class:`~conveyor.errors.BrokerReadOnly`, anything else :class:`~conveyor.errors.BrokerError`.
Messages name the server as ``host:port`` and never include the password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, unquote, urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from conveyor.errors import (
    BrokerError,
    BrokerReadOnly,
    BrokerUnavailable,
    ConfigurationError,
    ConveyorError,
)

DEFAULT_PORT: Final = 6379
#: Query option values that turn Redis Cluster mode on / off (``?cluster=true``).
_TRUE: Final = frozenset({"true", "yes", "1", "on"})
_FALSE: Final = frozenset({"false", "no", "0", "off"})


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Connection settings of the Redis broker.

    Attributes:
        socket_timeout_s: the longest a command may wait for its reply (blocking waits are cut
            into slices shorter than this).
        connect_timeout_s: the longest a connection attempt may take.
        health_check_interval_s: an idle pooled connection is PINGed before reuse after this long.
        max_connections: the pool size cap (None: unbounded; each blocked waiter holds one).
            Lua scripts (the transitions) run on a lane of connections of their own (see
            :mod:`.scripts`): one per script call in flight, at most 8 kept idle.
    """

    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    health_check_interval_s: float = 10.0
    max_connections: int | None = None

    def __post_init__(self) -> None:
        for name in ("socket_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")
        if self.health_check_interval_s < 0:
            raise ConfigurationError("health_check_interval_s must be >= 0")
        if self.max_connections is not None and self.max_connections < 2:
            raise ConfigurationError("max_connections must be >= 2 (or None for no cap)")


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A checked broker URL: where it points, and how to show it without the password.

    ``url`` is what redis-py gets: the broker URL without conveyor's own ``cluster`` option.
    ``cluster`` means the host is a seed node of a Redis Cluster (``?cluster=true``).
    """

    url: str
    tls: bool
    host: str
    port: int
    db: int
    has_password: bool
    cluster: bool = False

    @property
    def where(self) -> str:
        """``host:port`` (for error messages)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        """The URL with the password replaced by ``***`` (query options dropped)."""
        scheme = "rediss" if self.tls else "redis"
        user = urlsplit(self.url).username or ""
        auth = f"{user}:***@" if self.has_password else (f"{user}@" if user else "")
        option = "?cluster=true" if self.cluster else ""
        return f"{scheme}://{auth}{self.where}/{self.db}{option}"


def parse_url(url: str) -> RedisAddress:
    """Check a ``redis://`` or ``rediss://`` URL; raise ConfigurationError naming what is wrong."""
    parts: SplitResult | None = None
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        # Never echo the URL itself: it may hold a password.
        raise ConfigurationError(
            "malformed Redis URL: the port is not a number in 0-65535; "
            "use redis://[user:password@]host:port/db"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"not a Redis URL scheme: {scheme!r}; use redis:// or rediss://")
    host = parts.hostname or ""
    if not host:
        raise ConfigurationError("malformed Redis URL: no host; use redis://host:port/db")
    path = parts.path.lstrip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ConfigurationError(
            f"malformed Redis URL: the database {path!r} is not a number; use redis://host:port/0"
        ) from None
    if db < 0:
        raise ConfigurationError("malformed Redis URL: the database number must be >= 0")
    cluster, query = _cluster_option(parts.query)
    if cluster and db != 0:
        raise ConfigurationError("a Redis Cluster has only database 0; use redis://host:port/0")
    return RedisAddress(
        url=parts._replace(query=query).geturl(),
        cluster=cluster,
        tls=scheme == "rediss",
        host=host,
        port=port,
        db=db,
        has_password=parts.password is not None,
    )


def _cluster_option(query: str) -> tuple[bool, str]:
    """The ``cluster`` option of a URL query, and the query without it (kept as written)."""
    cluster = False
    kept: list[str] = []
    for pair in query.split("&") if query else []:
        name, _, value = pair.partition("=")
        if unquote(name) != "cluster":
            kept.append(pair)
            continue
        flag = unquote(value).lower()
        if flag not in _TRUE | _FALSE:
            raise ConfigurationError(
                f"invalid Redis URL option cluster={flag!r}; use cluster=true or cluster=false"
            )
        cluster = flag in _TRUE
    return cluster, "&".join(kept)


def make_cluster_client(address: RedisAddress, options: RedisOptions) -> RedisCluster:
    """A redis.asyncio cluster client seeded by ``address``, with :func:`make_client`'s settings.

    The cluster client follows MOVED/ASK redirects itself (a redirected command did not run, so
    that is safe) and re-reads the slot map after a connection error; like the single-node
    client it does not retry a command whose reply was lost.
    """
    try:
        return RedisCluster.from_url(
            address.url,
            socket_timeout=options.socket_timeout_s,
            socket_connect_timeout=options.connect_timeout_s,
            health_check_interval=options.health_check_interval_s,
            # The cluster client caps each node's pool and has no "unbounded".
            max_connections=options.max_connections or 2**31,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            protocol=2,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid Redis URL option for {address.redacted}: {exc}"
        ) from None


def make_client(address: RedisAddress, options: RedisOptions) -> Redis:
    """A redis.asyncio client for ``address``: bounded timeouts, no hidden retries, RESP2.

    redis-py would retry failed commands with backoff; a retried script may run twice (the reply,
    not the command, may have been lost), and retries make an outage slow to surface. Stale
    pooled connections are still replaced: the pool checks a connection before lending it.
    """
    try:
        return Redis.from_url(
            address.url,
            socket_timeout=options.socket_timeout_s,
            socket_connect_timeout=options.connect_timeout_s,
            health_check_interval=options.health_check_interval_s,
            max_connections=options.max_connections,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            protocol=2,  # one reply shape across redis-py versions and servers
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid Redis URL option for {address.redacted}: {exc}"
        ) from None


@contextmanager
def translate_errors(action: str, address: RedisAddress) -> Iterator[None]:
    """Re-raise redis-py and socket errors raised inside the block as conveyor errors."""
    try:
        yield
    except ConveyorError:
        raise
    except (redis_errors.AuthenticationError, redis_errors.AuthorizationError) as exc:
        raise ConfigurationError(
            f"{action}: Redis at {address.where} refused the credentials ({type(exc).__name__}); "
            "check the user and password in the broker URL"
        ) from None
    except redis_errors.NoPermissionError as exc:
        raise ConfigurationError(
            f"{action}: the Redis user lacks a permission ({exc}); grant it in the server's ACL"
        ) from None
    except redis_errors.ReadOnlyError:
        raise BrokerReadOnly(
            f"{action}: Redis at {address.where} is a read-only replica; point the broker URL "
            "at the primary"
        ) from None
    except redis_errors.OutOfMemoryError:
        # Full with maxmemory-policy noeviction: Redis refuses every write but still serves
        # reads, i.e. read-only until memory is freed. As BrokerReadOnly the worker's loops back
        # off and retry (a plain BrokerError would kill them) and the API answers 503. The
        # refused command (or script, at its first write) wrote nothing.
        raise BrokerReadOnly(
            f"{action}: Redis at {address.where} is out of memory (used memory > maxmemory, "
            "eviction policy noeviction) and refuses writes; nothing was written. Free memory "
            "or raise maxmemory, then retry"
        ) from None
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        # OSError covers the builtin TimeoutError that asyncio raises.
        raise BrokerUnavailable(
            f"{action}: Redis at {address.where} is unavailable ({_reason(exc)}); check that "
            "redis-server is running and reachable from here, then retry"
        ) from exc
    except redis_errors.RedisError as exc:
        raise BrokerError(
            f"{action}: Redis at {address.where} replied with an error: {exc}"
        ) from exc
    except redis_errors.RedisClusterException as exc:
        # The cluster client's own errors (not a RedisError): no reachable node, slots not
        # covered, a command whose keys span slots.
        raise _cluster_error(action, address, exc) from exc


def _cluster_error(
    action: str, address: RedisAddress, exc: redis_errors.RedisClusterException
) -> ConveyorError:
    cause = exc.__cause__
    if isinstance(cause, redis_errors.RedisClusterException) and "not enabled" in str(cause):
        return ConfigurationError(
            f"{action}: Redis at {address.where} is not a Redis Cluster node; "
            "drop ?cluster=true from the broker URL"
        )
    unreachable = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
    if (
        isinstance(exc, redis_errors.SlotNotCoveredError)
        or isinstance(cause, unreachable)
        or "not covered" in str(exc)
    ):
        return BrokerUnavailable(
            f"{action}: the Redis Cluster seeded by {address.where} is unavailable "
            f"({_reason(exc)}); check that its nodes are running and reachable, then retry"
        )
    return BrokerError(f"{action}: the Redis Cluster client refused the command: {exc}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
