"""RedisBroker: the distributed broker; each transition is one Lua script on the queue's slot.

Producers, consumers and the control plane live here; reads are in :mod:`.reads`, the event
stream and the blocking wake-ups in :mod:`.events`, the key schema in :mod:`.keys` and the Lua
in ``lua/``. A broker object survives a Redis outage: calls raise BrokerUnavailable while the
server is away and work again once it is back (the pool replaces dead connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Final

import msgspec
from redis.asyncio import Redis, RedisCluster

from conveyor.brokers.base import (
    DEFAULT_EVENT_RETENTION,
    DEFAULT_MAX_LOG_LINES,
    Broker,
    BrokerCapabilities,
    ExpiredReport,
    JobEvent,
    JobPage,
    LogPage,
)
from conveyor.brokers.redis import control, events, reads
from conveyor.brokers.redis.cluster import ClusterScripts, share_command_table
from conveyor.brokers.redis.connection import (
    RedisAddress,
    RedisOptions,
    make_client,
    make_cluster_client,
    parse_url,
    translate_errors,
)
from conveyor.brokers.redis.enqueue import ENQUEUE_CHUNK, enqueue_jobs
from conveyor.brokers.redis.keys import DEFAULT_PREFIX, GlobalKeys, QueueKeys
from conveyor.brokers.redis.records import (
    MAX_BATCH,
    as_str,
    build_job,
    build_jobs,
    opt_arg,
    pack,
    text,
)
from conveyor.brokers.redis.scripts import Scripts
from conveyor.clock import Clock
from conveyor.codec import Codec
from conveyor.errors import (
    BrokerError,
    ConfigurationError,
    ErrorCode,
    InvalidJobError,
    error_for_code,
)
from conveyor.job import FailureReason, Job, JobState, Lease, validate_queue_name

#: Scheduled jobs that reserve promotes before taking work.
PROMOTE_ON_RESERVE: Final = 1000
MAX_DESCRIPTION: Final = 1024


class RedisBroker(Broker):
    """Jobs in Redis (``redis://`` / ``rediss://``), Cluster-safe: one hash slot per queue.

    Args:
        url: ``redis://[user:password@]host[:port][/db]`` or ``rediss://...`` (TLS; ssl options
            such as ``ssl_cert_reqs`` and ``ssl_ca_certs`` go in the query string). For a Redis
            Cluster, name any one node and add ``?cluster=true``
            (``redis://node:7000/0?cluster=true``): the broker then uses redis-py's cluster
            client, which finds the other nodes and sends each queue's commands to the master
            of its slot (see :mod:`.cluster`).
        prefix: the key namespace, so several apps can share one database.
        socket_timeout_s, connect_timeout_s, health_check_interval_s, max_connections:
            see :class:`~conveyor.brokers.redis.connection.RedisOptions`.
        clock, codec, max_log_lines, event_retention: see :class:`~conveyor.brokers.base.Broker`.
    """

    capabilities: ClassVar[BrokerCapabilities] = BrokerCapabilities(durable=True, shared=True)
    scheme: ClassVar[str] = "redis"

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        health_check_interval_s: float = 10.0,
        max_connections: int | None = None,
        clock: Clock | None = None,
        codec: Codec | None = None,
        max_log_lines: int = DEFAULT_MAX_LOG_LINES,
        event_retention: int = DEFAULT_EVENT_RETENTION,
    ) -> None:
        super().__init__(
            clock=clock, codec=codec, max_log_lines=max_log_lines, event_retention=event_retention
        )
        if max_log_lines < 1 or event_retention < 1:
            raise ConfigurationError("max_log_lines and event_retention must be >= 1")
        try:
            validate_queue_name(prefix)  # the prefix goes inside hash tags, like a queue name
        except InvalidJobError:
            raise ConfigurationError(
                f"invalid key prefix {prefix!r}; use letters, digits, '_', '.' or '-'"
            ) from None
        self.address: RedisAddress = parse_url(url)
        self.options = RedisOptions(
            socket_timeout_s=socket_timeout_s,
            connect_timeout_s=connect_timeout_s,
            health_check_interval_s=health_check_interval_s,
            max_connections=max_connections,
        )
        self.prefix = prefix
        self.global_keys = GlobalKeys(prefix)
        self._queue_keys: dict[str, QueueKeys] = {}
        self._client: Redis | RedisCluster | None = None
        self._scripts: Scripts | ClusterScripts | None = None
        self._closed = False
        #: Whether one command may name keys of several queues: not on Redis Cluster (the
        #: ``cluster`` URL option, or a cluster node detected at connect), where enqueue takes
        #: two steps and waits and event reads go queue by queue.
        self.multi_queue_commands = not self.address.cluster

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        """Build (but do not connect) a broker for ``url``; see the class for ``options``."""
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"RedisBroker({self.address.redacted!r}, prefix={self.prefix!r})"

    # -- plumbing shared with reads.py and events.py ---------------------------------------------

    @property
    def redis(self) -> Redis | RedisCluster:
        """The connected client; raises if :meth:`connect` was not called (or after close)."""
        if self._client is None:
            raise _not_connected()
        return self._client

    def is_closed(self) -> bool:
        """Whether close() was called (subscriptions end, waits return) since the last connect."""
        return self._closed

    def queue_keys(self, queue: str) -> QueueKeys:
        """The keys of ``queue`` (validated once: the name goes inside a hash tag)."""
        keys = self._queue_keys.get(queue)
        if keys is None:
            keys = self._queue_keys[queue] = QueueKeys(self.prefix, validate_queue_name(queue))
        return keys

    @contextmanager
    def boundary(self, action: str) -> Iterator[None]:
        """Translate driver exceptions raised inside the block (see :mod:`.connection`).

        Also restores a lost cancellation: redis-py sends commands under ``asyncio.wait_for``,
        which before Python 3.12 returns normally when a cancellation arrives just as the send
        completes. A cancelled task would then carry on (a subscriber or fetcher that never
        stops), so a cancel requested during the block is raised when it ends.
        """
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        with translate_errors(action, self.address):
            yield
        if task is not None and task.cancelling() > cancelling:
            raise asyncio.CancelledError

    async def run_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script (errors are translated by the caller's :meth:`boundary`)."""
        if self._scripts is None:
            raise _not_connected()
        return await self._scripts.run(name, keys, args)

    def _common(self) -> list[Any]:
        """ARGV[1..2] of every per-queue script: now (ms) and the event retention."""
        return [self.clock.now_ms(), self.event_retention]

    async def queue_of(self, job_id: str) -> str | None:
        """The queue of a job, from the global index (None if it has no entry)."""
        raw = await self.redis.hget(self.global_keys.index, job_id)
        return None if raw is None else text(raw)

    def _check(self, reply: Any, action: str, job_id: str) -> Any:
        """Raise the mapped error for a script's negative code, else return the reply."""
        if isinstance(reply, int) and reply < 0:
            raise error_for_code(reply, action=action, job_id=job_id)
        return reply

    # -- lifecycle -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the client, check the server answers and load the scripts; idempotent."""
        if self._client is None or self._scripts is None:
            self._client, self._scripts = self._make_client()
        client, scripts = self._client, self._scripts
        self._closed = False
        with self.boundary("connect"):
            if isinstance(client, RedisCluster):
                await client.initialize()  # reads the slot map from the seed node
            await client.ping()
            await scripts.load()
            if not self.address.cluster:
                cluster = await client.info("cluster")
                # A cluster node reached without ?cluster=true (say, one that owns every slot)
                # refuses commands that span slots, so go queue by queue there too.
                self.multi_queue_commands = not int(cluster.get("cluster_enabled", 0))

    def _make_client(self) -> tuple[Redis | RedisCluster, Scripts | ClusterScripts]:
        """The client for the URL and the script runner that goes with it."""
        if self.address.cluster:
            cluster = make_cluster_client(self.address, self.options)
            share_command_table(cluster, self.address.where)
            return cluster, ClusterScripts(cluster)
        client = make_client(self.address, self.options)
        return client, Scripts(client, timeout_s=self.options.socket_timeout_s)

    async def close(self) -> None:
        """Close every connection (ending subscriptions and waits); idempotent, never raises."""
        self._closed = True
        client, self._client = self._client, None
        scripts, self._scripts = self._scripts, None
        if scripts is not None:
            await scripts.close()
        if client is not None:
            # Closing connections to a dead server may fail; there is nothing left to do then.
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> None:
        """PING the server; BrokerUnavailable within the socket timeout if it does not answer."""
        with self.boundary("ping"):
            await self.redis.ping()

    # -- producers -------------------------------------------------------------------------------

    async def _enqueue(self, jobs: list[Job]) -> list[str]:
        return await enqueue_jobs(self, jobs)

    async def start(self, job_id: str) -> Job:
        """``pending`` -> ``queued`` (or ``scheduled``); JobNotFound, InvalidTransition."""
        return await self._by_id("start", job_id)

    async def _by_id(self, action: str, job_id: str) -> Job:
        """Run a one-job script (start, cancel) on the job's queue, found through the index."""
        with self.boundary(action):
            queue = await self.queue_of(job_id)
            if queue is None:
                raise error_for_code(ErrorCode.JOB_NOT_FOUND, action=action, job_id=job_id)
            reply = await self.run_script(
                action, self.queue_keys(queue).script_keys, [*self._common(), job_id]
            )
        record, meta = self._check(reply, action, job_id)
        return build_job(self.codec, record, meta)

    # -- consumers -------------------------------------------------------------------------------

    async def reserve(
        self, queue: str, n: int, *, lease_s: float, worker_id: str = ""
    ) -> list[Job]:
        """Take up to ``n`` due jobs of ``queue`` (promoting due scheduled jobs first)."""
        keys = self.queue_keys(queue)
        lease_ms = max(1, round(lease_s * 1000))
        out: list[Job] = []
        with self.boundary("reserve"):
            while len(out) < n:
                want = min(n - len(out), MAX_BATCH)
                args = [
                    *self._common(),
                    want,
                    lease_ms,
                    worker_id,
                    secrets.token_hex(8),
                    PROMOTE_ON_RESERVE,
                ]
                flat = await self.run_script("reserve", keys.script_keys, args)
                out += build_jobs(self.codec, flat)
                if len(flat) < 2 * want:
                    break  # the queue ran dry
        return out

    async def wait_for_jobs(self, queues: Sequence[str], timeout_s: float) -> None:
        """Block on the queues' wake-up lists (BLPOP), at most until a scheduled job is due."""
        await events.wait_for_jobs(self, queues, timeout_s)

    async def extend_lease(self, leases: Sequence[Lease], lease_s: float) -> list[bool]:
        """Push held leases to now + lease_s, one script call per queue; False where not held."""
        lease_ms = max(1, round(lease_s * 1000))
        out = [False] * len(leases)
        with self.boundary("extend_lease"):
            for queue, positions in _group(leases).items():
                keys = self.queue_keys(queue).script_keys
                for chunk in _chunks(positions):
                    items = [(leases[i].job_id, leases[i].token) for i in chunk]
                    args = [*self._common(), lease_ms, pack(items)]
                    held = await self.run_script("extend_lease", keys, args)
                    for i, flag in zip(chunk, held, strict=True):
                        out[i] = flag == 1
        return out

    def _result_arg(self, lease: Lease, result: Any) -> msgspec.Raw | str:
        if result is None:
            return ""
        return as_str(self.codec.check_value(result, what=f"job {lease.job_id} result"))

    async def ack(self, lease: Lease, result: Any = None) -> None:
        """``running`` -> ``completed``; LeaseLost for a stale token, JobNotFound if gone."""
        item = (lease.job_id, lease.token, self._result_arg(lease, result))
        with self.boundary("ack"):
            (code,) = await self.run_script(
                "ack", self.queue_keys(lease.queue).script_keys, [*self._common(), pack([item])]
            )
        self._check(code, "ack", lease.job_id)

    async def ack_many(self, items: Sequence[tuple[Lease, Any]]) -> list[bool]:
        """Ack in one script call per queue; per item, False if its lease is stale or it is gone.

        Results are encoded before any job changes, so an unencodable one raises and acks nothing.
        """
        leases = [lease for lease, _ in items]
        encoded = [self._result_arg(lease, result) for lease, result in items]
        out = [False] * len(items)
        with self.boundary("ack"):
            for queue, positions in _group(leases).items():
                keys = self.queue_keys(queue).script_keys
                for chunk in _chunks(positions):
                    rows = [(leases[i].job_id, leases[i].token, encoded[i]) for i in chunk]
                    codes = await self.run_script("ack", keys, [*self._common(), pack(rows)])
                    for i, code in zip(chunk, codes, strict=True):
                        out[i] = code == 1
        return out

    async def ack_and_reserve(
        self,
        acks: Sequence[tuple[Lease, Any]],
        queue: str,
        n: int,
        *,
        lease_s: float,
        worker_id: str = "",
    ) -> tuple[list[bool], list[Job]]:
        """Ack ``acks`` (leases of ``queue``) and reserve up to ``n`` jobs: one script call.

        Batches past the script's size cap fall back to :meth:`ack_many` then :meth:`reserve`.
        """
        self._check_ack_queue(acks, queue)
        if len(acks) > MAX_BATCH or n > MAX_BATCH:
            return await super().ack_and_reserve(
                acks, queue, n, lease_s=lease_s, worker_id=worker_id
            )
        rows = [
            (lease.job_id, lease.token, self._result_arg(lease, result)) for lease, result in acks
        ]
        args = [
            *self._common(),
            pack(rows),
            max(0, n),
            max(1, round(lease_s * 1000)),
            worker_id,
            secrets.token_hex(8),
            PROMOTE_ON_RESERVE,
        ]
        with self.boundary("ack_and_reserve"):
            codes, flat = await self.run_script(
                "ack_and_reserve", self.queue_keys(queue).script_keys, args
            )
        return [code == 1 for code in codes], build_jobs(self.codec, flat)

    async def _lease_script(self, action: str, lease: Lease, *extra: Any) -> Job:
        args = [*self._common(), lease.job_id, lease.token, *extra]
        with self.boundary(action):
            reply = await self.run_script(action, self.queue_keys(lease.queue).script_keys, args)
        record, meta = self._check(reply, action, lease.job_id)
        return build_job(self.codec, record, meta)

    async def retry(
        self,
        lease: Lease,
        *,
        run_at_ms: int,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``scheduled`` at ``run_at_ms`` (``queued`` if due); charges one."""
        return await self._lease_script(
            "retry", lease, int(run_at_ms), opt_arg(error), opt_arg(traceback)
        )

    async def dead_letter(
        self,
        lease: Lease,
        *,
        reason: FailureReason,
        error: str | None = None,
        traceback: str | None = None,
    ) -> Job:
        """``running`` -> ``failed`` with reason, error and traceback; charges one."""
        return await self._lease_script(
            "dead_letter", lease, FailureReason(reason).value, opt_arg(error), opt_arg(traceback)
        )

    async def release(self, lease: Lease) -> Job:
        """``running`` -> ``queued`` at its original place, charging nothing."""
        return await self._lease_script("release", lease)

    async def requeue_expired(self, queue: str, *, limit: int = 1000) -> ExpiredReport:
        """Recover jobs of ``queue`` whose lease deadline has passed (see the contract)."""
        keys = self.queue_keys(queue)
        with self.boundary("requeue_expired"):
            requeued, dead = await self.run_script(
                "requeue_expired", keys.script_keys, [*self._common(), max(0, limit)]
            )
        return ExpiredReport(
            requeued=[raw.decode() for raw in requeued],
            dead_lettered=[raw.decode() for raw in dead],
        )

    async def promote_scheduled(self, queue: str, *, limit: int = 1000) -> int:
        """``scheduled`` -> ``queued`` for due jobs of ``queue``; returns how many."""
        keys = self.queue_keys(queue)
        with self.boundary("promote_scheduled"):
            count = await self.run_script(
                "promote_scheduled", keys.script_keys, [*self._common(), max(0, limit)]
            )
        return int(count)

    async def next_scheduled_ms(self, queue: str) -> int | None:
        """The earliest ``run_at_ms`` of the scheduled jobs of ``queue``, or None."""
        key = self.queue_keys(queue).states[JobState.SCHEDULED]
        with self.boundary("next_scheduled_ms"):
            first = await self.redis.zrange(key, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    # -- control plane ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Stop a live job (revoking a running job's lease); InvalidTransition if finished."""
        return await self._by_id("cancel", job_id)

    async def delete(self, job_id: str) -> None:
        """Remove a job in any state with its result and logs; JobNotFound if there is none."""
        index = self.global_keys.index
        with self.boundary("delete"):
            queue = await self.queue_of(job_id)
            if queue is None:
                raise error_for_code(ErrorCode.JOB_NOT_FOUND, action="delete", job_id=job_id)
            keys = self.queue_keys(queue)
            code = await self.run_script(
                "delete", (*keys.script_keys, keys.log(job_id)), [*self._common(), job_id]
            )
            # The index entry goes last (and also when it was dangling).
            await self.redis.hdel(index, job_id)
        self._check(code, "delete", job_id)

    async def redrive(self, queue: str, job_ids: Sequence[str] | None = None) -> int:
        """``failed`` (or, by id, ``stopped``) -> ``queued`` with a fresh attempt count."""
        return await control.redrive(self, queue, job_ids)

    async def purge(self, queue: str, states: Iterable[JobState] | None = None) -> int:
        """Delete the jobs of ``queue`` in ``states`` (default: work not started); count."""
        return await control.purge(self, queue, states)

    async def cleanup(self, retention_s: float, *, queue: str | None = None) -> int:
        """Delete finished jobs that finished over ``retention_s`` ago; returns how many."""
        return await control.cleanup(self, retention_s, queue=queue)

    # -- progress and logs -----------------------------------------------------------------------

    async def set_progress(
        self, lease: Lease, progress: int | None = None, description: str | None = None
    ) -> None:
        """Record a running job's progress (clamped to 0-100) and/or description (cut to 1024)."""
        progress_arg = "" if progress is None else max(0, min(100, int(progress)))
        if description is not None:
            description = str(description)[:MAX_DESCRIPTION]
        args = [*self._common(), lease.job_id, lease.token, progress_arg, opt_arg(description)]
        with self.boundary("set_progress"):
            code = await self.run_script(
                "set_progress", self.queue_keys(lease.queue).script_keys, args
            )
        self._check(code, "set_progress", lease.job_id)

    async def append_log(self, lease: Lease, lines: Sequence[str], *, dropped: int = 0) -> None:
        """Append log lines (the token is not checked; the job must exist)."""
        keys = self.queue_keys(lease.queue)
        script_keys = (*keys.script_keys, keys.log(lease.job_id))
        if isinstance(lines, str):  # a lone string would otherwise be logged a character per line
            lines = [lines]
        texts = [str(line) for line in lines]
        # An empty call still runs once: it reports JobNotFound for a missing job.
        chunks = [texts[i : i + ENQUEUE_CHUNK] for i in range(0, len(texts), ENQUEUE_CHUNK)]
        upstream = max(0, dropped)  # counted once, with the first chunk
        with self.boundary("append_log"):
            for chunk in chunks or [[]]:
                args = [*self._common(), lease.job_id, self.max_log_lines, upstream, *chunk]
                upstream = 0
                code = await self.run_script("append_log", script_keys, args)
                self._check(code, "append_log", lease.job_id)

    async def logs(self, job_id: str, *, offset: int = 0, limit: int | None = None) -> LogPage:
        """A job's kept log lines from ``offset``; JobNotFound if there is no such job."""
        return await reads.logs(self, job_id, offset=offset, limit=limit)

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return await reads.get(self, job_id)

    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        states: Iterable[JobState] | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs matching the filters, newest enqueue first (see :func:`.reads.list_jobs`)."""
        return await reads.list_jobs(
            self, queue=queue, states=states, task=task, limit=limit, cursor=cursor
        )

    async def counts(self, queue: str | None = None) -> dict[str, dict[JobState, int]]:
        """Per queue, the number of jobs in each state."""
        return await reads.counts(self, queue)

    async def queues(self) -> list[str]:
        """Names of the queues that have (or had) jobs, sorted."""
        with self.boundary("queues"):
            return sorted(await self.queue_names())

    async def queue_names(self) -> list[str]:
        """The known queue names, unsorted (errors are translated by the caller)."""
        return [text(raw) for raw in await self.redis.smembers(self.global_keys.queues)]

    # -- events ----------------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        queue: str | None = None,
        job_id: str | None = None,
        after: str | None = None,
    ) -> AsyncIterator[JobEvent]:
        """Stream job events from the queues' Redis streams (see :mod:`.events`)."""
        if queue is not None:
            self.queue_keys(queue)  # a bad name fails here, not inside the iterator
        cursor = events.check_cursor(after)  # a bad cursor fails here too
        return events.subscribe(self, queue=queue, job_id=job_id, after=cursor)


def _not_connected() -> BrokerError:
    return BrokerError(
        "the Redis broker is not connected; await broker.connect() first "
        "(or use it as an async context manager)"
    )


def _chunks(positions: list[int]) -> list[list[int]]:
    """``positions`` cut into script-sized batches."""
    return [positions[i : i + MAX_BATCH] for i in range(0, len(positions), MAX_BATCH)]


def _group(leases: Sequence[Lease]) -> dict[str, list[int]]:
    """Positions of ``leases`` by queue, in order (one script call per queue)."""
    by_queue: dict[str, list[int]] = {}
    for i, lease in enumerate(leases):
        by_queue.setdefault(lease.queue, []).append(i)
    return by_queue
